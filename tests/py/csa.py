#!/usr/bin/env python3
"""csa.py OUT SOP_INSTANCE_UID: writes a small Siemens CSA Non-Image Storage instance
(SOP Class 1.3.12.2.1107.5.9.1, a vendor SOP class no standard table holds), explicit VR
little endian, with a private CSA header element, as Part-10 file OUT."""
import sys
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

out, sop = sys.argv[1], sys.argv[2]
CSA = "1.3.12.2.1107.5.9.1"
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = CSA
meta.MediaStorageSOPInstanceUID = sop
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds = Dataset()
ds.file_meta = meta
ds.SOPClassUID = CSA
ds.SOPInstanceUID = sop
ds.Modality = "MR"
ds.PatientName = "Csa^Patient"
ds.PatientID = "CSA1"
ds.StudyInstanceUID = sop + ".1"
ds.SeriesInstanceUID = sop + ".2"
ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
ds.add_new(0x00291010, "OB", b"SV10\x04\x03\x02\x01" + bytes(range(56)))
ds.save_as(out, enforce_file_format=True)
