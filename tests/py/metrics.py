"""Fetches a dicomgate /metrics page and parses it with Prometheus's own Python client
(prometheus_client's OpenMetrics parser). Prints one line per sample: NAME{k=v,...} VALUE
(labels sorted). Exits non-zero if the page does not parse."""
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

url = sys.argv[1]
with urllib.request.urlopen(url, timeout=10) as r:
    ctype = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
print("content-type", ctype)
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
