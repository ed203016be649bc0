"""What the acceptor sent, when pynetdicom's association says neither rejected nor established.

pynetdicom 3.0's requestor (acse._negotiate_as_requestor) sends the A-ASSOCIATE-RQ, then looks
at its socket's `_is_connected`; when the acceptor's A-ASSOCIATE-RJ arrives and the DUL thread
has already closed the socket by then (a busy machine: the node rejects within a millisecond),
it calls abort() and the association reads as aborted although the rejection was received.
Bind `handlers()` to the association and ask `rejected()` after: the RJ PDU's own (result,
source, reason), as the DUL decoded it, or None."""
from pynetdicom import evt

_seen = []


def _on_pdu(event):
    p = event.pdu
    if type(p).__name__ == "A_ASSOCIATE_RJ":
        _seen.append((p.result, p.source, p.reason_diagnostic))


def handlers():
    return [(evt.EVT_PDU_RECV, _on_pdu)]


def rejected():
    return _seen[0] if _seen else None
