"""`mmdl-node status`: the node's health and metrics at a glance, from its HTTP port or, when it is down, its catalog."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from indexer.catalog import Catalog


class NodeStatus(NamedTuple):
    healthy: bool  # the running node answered that it is healthy
    lines: list[str]  # what `mmdl-node status` prints


def _base_url(settings: Settings) -> str:
    host = settings.metrics.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return f"http://{host}:{settings.metrics.port}"


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:  # 503 still carries the health body
        return error.code, error.read()


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def _live(settings: Settings) -> NodeStatus:
    url = _base_url(settings)
    code, body = _fetch(f"{url}/health")
    checks = json.loads(body)
    samples = _samples(_fetch(f"{url}/metrics")[1].decode())

    def one(name: str, **labels: str) -> float:
        return sum(v for l, v in samples.get(name, []) if all(l.get(k) == x for k, x in labels.items()))

    receivers = f", receivers {checks['receivers']}" if "receivers" in checks else ""
    lines = [f"source: {url} (live node)",
             f"health: {checks['status']} (HTTP {code}; dicom {checks['dicom']}, catalog {checks['catalog']}{receivers})"]
    for labels, count in samples.get("mmdl_received_instances_total", []):
        ae = labels["calling_ae"]
        mb = one("mmdl_received_bytes_total", calling_ae=ae) / 2**20
        lines.append(f"received from {ae}: {int(count)} instances, {mb:.1f} MiB (since start)")
    lines.append(f"queue: {int(one('mmdl_pending', kind='image'))} images, "
                 f"{int(one('mmdl_pending', kind='report_text'))} reports pending; "
                 f"{int(one('mmdl_held_reports'))} reports waiting for their study")
    lines.append(f"embedded since start: {int(one('mmdl_embedded_total', kind='image'))} images, "
                 f"{int(one('mmdl_embedded_total', kind='report'))} reports")
    lines.append(f"index: {int(one('mmdl_index_size'))} studies ({checks['index']})")
    for kind in ("similar", "catalog"):
        count = one("mmdl_query_seconds_count", kind=kind)
        if count:
            mean_ms = 1000 * one("mmdl_query_seconds_sum", kind=kind) / count
            lines.append(f"{kind} queries: {int(count)}, mean {mean_ms:.1f} ms")
    for labels, count in samples.get("mmdl_failures_total", []):
        lines.append(f"failures {labels['reason']}: {int(count)}")
    return NodeStatus(checks["status"] == "ok", lines)


def _from_catalog(settings: Settings, why: str) -> NodeStatus:
    catalog = Catalog(settings.catalog_url)
    try:
        lines = [f"source: catalog {settings.catalog_url} (node not reachable: {why})",
                 f"health: catalog {'reachable' if catalog.reachable() else 'NOT reachable'}"]
        for ae, count, size in catalog.received_by_caller():
            lines.append(f"received from {ae or '(unknown)'}: {count} instances, {size / 2**20:.1f} MiB (all time)")
        counts = catalog.state_counts()
        lines.append(f"queue: {counts.get('image.pending', 0)} images, {counts.get('report_text.pending', 0)} reports "
                     f"pending; {catalog.held_report_count()} reports waiting for their study")
        lines.append("items: " + ", ".join(f"{key} {n}" for key, n in sorted(counts.items())))
        lines.append(f"index: {catalog.study_vector_count()} studies with a vector")
        return NodeStatus(False, lines)
    finally:
        catalog.close()


def node_status(settings: Settings) -> NodeStatus:
    """What `mmdl-node status` prints, which says whether it came from the running node or from the catalog,
    and whether the running node is healthy (never, when it is not reachable)."""
    if not settings.metrics.enabled:
        return _from_catalog(settings, "metrics.enabled is false")
    try:
        return _live(settings)
    except (OSError, ValueError, KeyError) as error:
        return _from_catalog(settings, f"{_base_url(settings)}: {type(error).__name__}")
