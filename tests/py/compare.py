#!/usr/bin/env python3
"""compare.py ORIGINAL STORED [EXPECTED_TS]: exits 0 when STORED (written by dicomgate) holds the
same data set as ORIGINAL (element by element, read back with pydicom), carries the file meta we
promise, and, if given, was stored in EXPECTED_TS. Prints what differs otherwise."""
import sys
import pydicom

orig = pydicom.dcmread(sys.argv[1], force=True)
stored = pydicom.dcmread(sys.argv[2])
errors = []
meta = stored.file_meta
if meta.MediaStorageSOPInstanceUID != orig.SOPInstanceUID:
    errors.append(f"meta SOP instance {meta.MediaStorageSOPInstanceUID} != {orig.SOPInstanceUID}")
if meta.MediaStorageSOPClassUID != orig.SOPClassUID:
    errors.append("meta SOP class differs")
if meta.ImplementationClassUID != "2.25.186117930467893426514372609848271207512":
    errors.append("implementation class UID is not ours")
if len(sys.argv) > 3 and meta.TransferSyntaxUID != sys.argv[3]:
    errors.append(f"stored in {meta.TransferSyntaxUID}, expected {sys.argv[3]}")
# Data Set Trailing Padding (FFFC,FFFC) has no meaning and may be dropped by any sender
# (PS3.10 §7.2); DCMTK's storescu drops it when it re-encodes.
IGNORED = {0xFFFCFFFC}
for elem in orig:
    if elem.tag.group == 0x0002 or elem.tag in IGNORED:
        continue
    other = stored.get(elem.tag)
    if other is None:
        errors.append(f"{elem.tag} missing")
    elif elem.VR == "SQ":
        if len(elem.value) != len(other.value) or any(a != b for a, b in zip(elem.value, other.value)):
            errors.append(f"{elem.tag} sequence differs")
    elif elem.value != other.value:
        errors.append(f"{elem.tag} {elem.keyword} differs")
extra = [e.tag for e in stored if e.tag.group != 0x0002 and e.tag not in orig]
if extra:
    errors.append(f"extra elements {extra[:5]}")
if errors:
    print("\n".join(errors)); sys.exit(1)
