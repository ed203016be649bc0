#!/usr/bin/env python3
"""strip_source_ae.py: a processing command (DICOMGATE_INPUT_DIR → DICOMGATE_OUTPUT_DIR) that
writes each input instance again as a new result without a Source AE Title (0002,0016), as a
result a processing step makes keeps none: the file meta is pydicom's own."""
import os
import pydicom

src, dst = os.environ["DICOMGATE_INPUT_DIR"], os.environ["DICOMGATE_OUTPUT_DIR"]
n = 0
for root, _, names in os.walk(src):
    for name in names:
        try:
            ds = pydicom.dcmread(os.path.join(root, name))
        except Exception:
            continue
        if "SourceApplicationEntityTitle" in ds.file_meta:
            del ds.file_meta.SourceApplicationEntityTitle
        ds.SeriesDescription = "RESULT"
        ds.save_as(os.path.join(dst, f"result{n}.dcm"), enforce_file_format=True)
        n += 1
