#!/usr/bin/env python3
"""make_instances.py DIR COUNT ROWS: writes COUNT explicit-VR-LE CT instances of ROWS x ROWS x
16 bit (16 -> ~1.5 KB "tiny", 512 -> ~0.5 MB "CT slice"), 3 patients, one series each."""
import os, sys
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

out, count, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(out, exist_ok=True)
studies = [generate_uid() for _ in range(3)]
series = [generate_uid() for _ in range(3)]
pixels = bytes((i * 7) % 251 for i in range(rows * rows * 2))
for i in range(count):
    p = i % 3
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = f"Perf^{p}"
    ds.PatientID = f"PERF{p}"
    ds.StudyInstanceUID = studies[p]
    ds.SeriesInstanceUID = series[p]
    ds.InstanceNumber = i + 1
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(os.path.join(out, f"{i:06d}.dcm"), enforce_file_format=True)
