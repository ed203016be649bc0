#!/usr/bin/env python3
"""interop_check.py CORPUS_DIR RECEIVED...: for each corpus file (interop_corpus.py), finds the
received Part-10 file with its SOP Instance UID among RECEIVED (files or folders, searched
recursively) and prints one line: KIND<TAB>VERDICT. VERDICT is "exact" when the data set bytes
and the transfer syntax are what was sent; otherwise what changed, compared element by element
(read back with pydicom): "as <UID>" for another transfer syntax, "(gggg,eeee) dropped",
"(gggg,eeee) added", "(gggg,eeee) VR A->B", "(gggg,eeee) value differs", and "re-encoded" when
every element is equal but the bytes are not (re-deflated, other length encoding); "missing" when
nothing arrived. Pixel data that only changed byte order with the transfer syntax is equal."""
import io, os, sys
import pydicom
from pydicom.filereader import _read_file_meta_info

BIG_ENDIAN = "1.2.840.10008.1.2.2"


def split(path):
    with open(path, "rb") as f:
        b = f.read()
    f = io.BytesIO(b)
    f.seek(132)
    meta = _read_file_meta_info(f)
    return str(meta.TransferSyntaxUID), b[f.tell():]


def files(paths):
    for p in paths:
        if os.path.isfile(p):
            yield p
        for root, _, names in os.walk(p):
            for n in names:
                yield os.path.join(root, n)


def same_value(tag, a, b, ts_a, ts_b):
    if a.value == b.value:
        return True
    if tag == 0x7FE00010 and (ts_a == BIG_ENDIAN) != (ts_b == BIG_ENDIAN):
        x = bytes(a.value)
        swapped = b"".join(x[i:i + 2][::-1] for i in range(0, len(x), 2))
        return swapped == bytes(b.value)
    return False


def verdict(sent, got):
    ts_a, body_a = split(sent)
    ts_b, body_b = split(got)
    if ts_a == ts_b and body_a == body_b:
        return "exact"
    a, b = pydicom.dcmread(sent), pydicom.dcmread(got)
    notes = [] if ts_a == ts_b else [f"as {ts_b}"]
    for e in a:
        if e.tag.group == 2:
            continue
        o = b.get(e.tag)
        if o is None:
            notes.append(f"{e.tag} dropped")
        elif e.VR != o.VR:
            notes.append(f"{e.tag} VR {e.VR}->{o.VR}")
        elif not same_value(e.tag, e, o, ts_a, ts_b):
            notes.append(f"{e.tag} value differs")
    notes += [f"{e.tag} added" for e in b if e.tag.group != 2 and e.tag not in a]
    if not notes:
        notes = ["re-encoded"]
    return "; ".join(notes)


corpus = {}
for p in sorted(files([sys.argv[1]])):
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    kind = os.path.basename(p)[3:-4]
    corpus[str(ds.SOPInstanceUID)] = (kind, p)
found = {}
for p in files(sys.argv[2:]):
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception:
        continue
    uid = str(ds.get("SOPInstanceUID", ""))
    if uid in corpus:
        found[uid] = p
for uid, (kind, p) in corpus.items():
    print(f"{kind}\t{verdict(p, found[uid]) if uid in found else 'missing'}")
