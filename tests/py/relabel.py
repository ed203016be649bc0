#!/usr/bin/env python3
"""relabel.py SRC DST TS_UID NEW_SOP_INSTANCE_UID: copies a Part-10 file, changing only its meta
transfer syntax and its SOP Instance UID. The node keeps data set bytes as received and never
decodes pixel data, so an encapsulated JPEG 2000 file relabelled HTJ2K (or video) exercises that
transfer syntax's negotiation and storage exactly as a real one would."""
import sys, pydicom
ds = pydicom.dcmread(sys.argv[1])
ds.file_meta.TransferSyntaxUID = sys.argv[3]
ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sys.argv[4]
ds.save_as(sys.argv[2], enforce_file_format=True)
