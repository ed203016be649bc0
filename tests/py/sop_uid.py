#!/usr/bin/env python3
"""sop_uid.py FILE: prints the file's SOP Instance UID and transfer syntax UID."""
import sys, pydicom
ds = pydicom.dcmread(sys.argv[1], force=True, stop_before_pixels=True)
# A file whose meta lacks the transfer syntax (rtstruct.dcm) is read, and sent, as implicit VR.
print(ds.SOPInstanceUID, getattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2"))
