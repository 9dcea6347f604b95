"""Configuration: defaults, every problem reported with its key path, the CLI check."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from tests.conftest import REPO_ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings.node.ae_title == "MMDL_NODE"
    assert settings.node.similar_ae_title == "MMDL_SIMILAR"
    assert settings.node.port == 11112
    assert settings.node.data_dir == tmp_path / "mmdl-data"
    assert settings.access.allowed_calling_aets == []
    assert settings.catalog_url == f"sqlite:///{tmp_path / 'mmdl-data' / 'catalog.sqlite3'}"


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, """
[node]
port = 0
ae_title = "A_TITLE_FAR_TOO_LONG"
colour = "blue"
[[peers]]
ae_title = "VIEWER"
host = "127.0.0.1"
port = 70000
[access]
allowed_calling_aets = ["OK", "BAD\\\\AE"]
[query]
top_k = 500
max_top_k = 50
""")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    problems = caught.value.problems
    assert any(p.startswith("node.port:") and "0" in p for p in problems)
    assert any(p.startswith("node.ae_title: must be at most 16 characters") for p in problems)
    assert "node.colour: unknown key" in problems
    assert any(p.startswith("peers[0].port:") and "70000" in p for p in problems)
    assert any(p.startswith("access.allowed_calling_aets[1]:") for p in problems)
    assert any(p.startswith("query:") and "max_top_k" in p for p in problems)
    assert len(problems) == 6


def test_duplicate_peers_and_equal_titles_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, """
[node]
ae_title = "SAME"
similar_ae_title = "SAME"
[[peers]]
ae_title = "V"
host = "h"
port = 104
[[peers]]
ae_title = "V"
host = "h2"
port = 105
""")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert "ae_title and similar_ae_title must differ" in text
    assert "repeated: V" in text


def test_receivers_with_tls_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, """
[node]
receivers = 2
[tls]
enabled = true
certificate = "server.crt"
private_key = "server.key"
""")
    with pytest.raises(ConfigError, match="node.receivers needs tls.enabled = false"):
        load_settings(path)
    assert load_settings(write(tmp_path, "[node]\nreceivers = 2\n")).node.receivers == 2


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[node\nport = 1"))
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "absent.toml")


def test_relative_paths_are_taken_from_the_file_folder(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[node]\ndata_dir = "store"\n[model]\npath = "m"\n'))
    assert settings.node.data_dir == tmp_path / "store"
    assert settings.model.path == tmp_path / "m"


def test_web_settings_are_checked(tmp_path: Path) -> None:
    defaults = load_settings(write(tmp_path, ""))
    assert (defaults.web.enabled, defaults.web.host, defaults.web.port, defaults.web.auth) == (False, "127.0.0.1",
                                                                                              8080, "none")
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, """
[web]
auth = "token"
token = "short"
ohif_url = "javascript:alert(1)"
"""))
    problems = caught.value.problems
    assert any(p.startswith("web:") and "token of at least 16" in p and "ohif_url must be an http(s) URL" in p
               for p in problems)
    with pytest.raises(ConfigError, match="web.tls: certificate and private_key are required"):
        load_settings(write(tmp_path, '[web.tls]\nenabled = true\ncertificate = "a.crt"\n'))
    with pytest.raises(ConfigError, match="web.port: "):
        load_settings(write(tmp_path, "[web]\nport = 0\n"))
    with pytest.raises(ConfigError, match="auth 'basic' needs username and password"):
        load_settings(write(tmp_path, '[web]\nauth = "basic"\nusername = "reader"\n'))
    with pytest.raises(ConfigError, match="web.tls.certificate: file not found"):
        load_settings(write(tmp_path, '[web.tls]\nenabled = true\ncertificate = "a.crt"\nprivate_key = "a.key"\n'))
    (tmp_path / "a.crt").write_text("x")
    (tmp_path / "a.key").write_text("x")
    web = load_settings(write(tmp_path, '[web.tls]\nenabled = true\ncertificate = "a.crt"\nprivate_key = "a.key"\n'))
    assert web.web.tls.certificate == tmp_path / "a.crt"  # relative to the file's folder, like [tls]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_config_check_command(tmp_path: Path) -> None:
    good = run_cli("config", "check", str(write(tmp_path, '[node]\nport = 4242\n')))
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout and "4242" in good.stdout
    bad = run_cli("config", "check", str(write(tmp_path, "[node]\nport = -1\n[scheduler]\nbatch_size = 0\n")))
    assert bad.returncode == 2
    assert "node.port:" in bad.stderr and "scheduler.batch_size:" in bad.stderr


def test_hl7_metrics_and_backfill_sections(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert (settings.hl7.enabled, settings.hl7.port, settings.hl7.accession_field) == (False, 2575, "OBR-3")
    assert (settings.metrics.enabled, settings.metrics.port) == (False, 9108)
    assert (settings.backfill.source, settings.backfill.modalities) == ("orthanc", ["CR", "DX"])
    bad = write(tmp_path, '[hl7]\naccession_field = "OBR-4"\nport = 0\n[backfill]\nsource = "dimse"\n'
                          'modalities = ["dx"]\nconcurrency = 0\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(bad)
    problems = "\n".join(caught.value.problems)
    for key in ("hl7.accession_field", "hl7.port", "backfill.modalities[0]", "backfill.concurrency"):
        assert key in problems, problems
    pacs = write(tmp_path, '[backfill]\nsource = "dimse"\n')
    with pytest.raises(ConfigError, match=r"needs \[backfill.pacs\]"):
        load_settings(pacs)


def test_hl7_sources_and_tls_are_validated(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert (settings.hl7.host, settings.hl7.allowed_hosts, settings.hl7.tls.enabled) == ("127.0.0.1", [], False)
    exposed = write(tmp_path, '[hl7]\nenabled = true\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match=r"hl7: host '0.0.0.0' listens beyond loopback: name the RIS in allowed"):
        load_settings(exposed)
    sources = ["10.1.2.3", "10.9.0.0/16", "ris.example.org", "fd00::/8"]
    listed = load_settings(write(tmp_path, f'[hl7]\nenabled = true\nhost = "0.0.0.0"\nallowed_hosts = {sources}\n'))
    assert listed.hl7.allowed_hosts == sources
    bad = write(tmp_path, '[hl7]\nallowed_hosts = ["10.1.2.3/8", "10.0.0.300", "ris example"]\n'
                          '[hl7.tls]\nenabled = true\ncertificate = "missing.crt"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(bad)
    problems = "\n".join(caught.value.problems)
    assert "hl7.allowed_hosts[0]: not a network in CIDR notation (10.1.2.3/8 has host bits set)" in problems
    assert "hl7.allowed_hosts[1]: must be an IP address, a CIDR network" in problems
    assert "hl7.allowed_hosts[2]: must be an IP address" in problems
    assert "hl7.tls: certificate and private_key are required when enabled" in problems
    (tmp_path / "hl7.crt").write_text("certificate")
    files = write(tmp_path, '[hl7.tls]\nenabled = true\ncertificate = "hl7.crt"\nprivate_key = "hl7.key"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(files)
    assert caught.value.problems == [f"hl7.tls.private_key: file not found, got '{tmp_path / 'hl7.key'}'"]
    (tmp_path / "hl7.key").write_text("key")
    assert load_settings(files).hl7.tls.certificate == tmp_path / "hl7.crt"


def test_search_depth_must_exceed_the_largest_top_k(tmp_path: Path) -> None:
    path = write(tmp_path, """
[query]
max_top_k = 100
search_depth = 100
""")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert any(p.startswith("query:") and "search_depth (100) must exceed max_top_k (100)" in p
               for p in caught.value.problems)
