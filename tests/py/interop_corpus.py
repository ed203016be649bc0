#!/usr/bin/env python3
"""interop_corpus.py OUTDIR: writes the interoperability matrix's corpus, one file per kind of
encoding, from pydicom's own test files, each given its own SOP Instance UID and one Patient ID
(INTEROP) so that a router-mode node forwards them as one batch. Prints one line per file:
KIND TRANSFER_SYNTAX SOP_INSTANCE_UID FILE. pydicom writes each file back in its own transfer
syntax (pixel data and other values untouched)."""
import os, sys
import pydicom
from pydicom.data import get_testdata_file

# kind: pydicom test file (its transfer syntax in the comment)
CORPUS = [
    ("explicit-le", "CT_small.dcm"),               # 1.2.840.10008.1.2.1
    ("implicit-le", "MR_small_implicit.dcm"),      # 1.2.840.10008.1.2
    ("deflated", "image_dfl.dcm"),                 # 1.2.840.10008.1.2.1.99
    ("big-endian", "MR_small_bigendian.dcm"),      # 1.2.840.10008.1.2.2 (retired)
    ("rle", "SC_rgb_rle.dcm"),                     # 1.2.840.10008.1.2.5
    ("jpeg-baseline", "SC_rgb_jpeg_dcmtk.dcm"),    # 1.2.840.10008.1.2.4.50
    ("jpeg-ls", "MR_small_jpeg_ls_lossless.dcm"),  # 1.2.840.10008.1.2.4.80
    ("jpeg-2000", "MR_small_jp2klossless.dcm"),    # 1.2.840.10008.1.2.4.90
    ("rt-plan", "rtplan.dcm"),                     # 1.2.840.10008.1.2, RT Plan Storage
    ("sr", "test-SR.dcm"),                         # 1.2.840.10008.1.2.1, Comprehensive SR
]

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for i, (kind, name) in enumerate(CORPUS):
    ds = pydicom.dcmread(get_testdata_file(name))
    uid = f"2.25.4711{i:02d}0815"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.PatientID = "INTEROP"
    path = os.path.join(out, f"{i:02d}-{kind}.dcm")
    ds.save_as(path, enforce_file_format=True)
    print(kind, ds.file_meta.TransferSyntaxUID, uid, path)
