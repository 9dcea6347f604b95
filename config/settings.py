"""The node's settings: one validated object, built from one TOML file or from the defaults."""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
MAX_ASSOCIATIONS = 1000  # the most node.max_associations may be


def _check_ae_title(value: str) -> str:
    """An AE title is 1-16 characters of the default repertoire, no backslash or control codes."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("must not be empty or only spaces")
    if len(stripped) > 16:
        raise ValueError("must be at most 16 characters")
    if _AE_FORBIDDEN.search(stripped) or not stripped.isascii():
        raise ValueError("must be printable ASCII without backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """The application entity: who it is, where it listens, where it keeps data."""

    ae_title: AETitle = "MMDL_NODE"
    similar_ae_title: AETitle = "MMDL_SIMILAR"
    host: str = "0.0.0.0"
    port: Port = 11112
    data_dir: Path = Path("mmdl-data")
    max_associations: Annotated[int, Field(ge=1, le=MAX_ASSOCIATIONS)] = 25
    max_pdu_size: Annotated[int, Field(ge=0)] = 262144
    acse_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    message_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    # Receiver processes for storage associations (dicom_node.receivers), to receive on several cores; 0: every
    # association in the node's own process. Without TLS only: a TLS connection cannot change process.
    receivers: Annotated[int, Field(ge=0, le=64)] = 0

    @model_validator(mode="after")
    def _distinct_titles(self) -> NodeSettings:
        if self.ae_title == self.similar_ae_title:
            raise ValueError("ae_title and similar_ae_title must differ")
        return self


class Peer(_Section):
    """A DICOM node the node may send to (C-MOVE destination); with check_host, its AE title is only
    accepted from its own host."""

    ae_title: AETitle
    host: str
    port: Port
    check_host: bool = False


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 B.1): TLS 1.2 or later, server certificate, optional client certificates."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None  # when set, clients must present a certificate it signed

    @model_validator(mode="after")
    def _files_given(self) -> TlsSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key are required when enabled")
        return self


class AccessSettings(_Section):
    allowed_calling_aets: list[AETitle] = []


class CatalogSettings(_Section):
    """Any SQLAlchemy URL; empty means SQLite (WAL) at <data_dir>/catalog.sqlite3."""

    url: str = ""


class IndexSettings(_Section):
    """HNSW parameters (hnswlib, cosine space) and how often the index is snapshotted."""

    m: Annotated[int, Field(ge=4, le=128)] = 32
    ef_construction: Annotated[int, Field(ge=10, le=2000)] = 200
    ef_search: Annotated[int, Field(ge=10, le=5000)] = 128
    snapshot_interval_s: Annotated[float, Field(gt=0)] = 60.0


class SchedulerSettings(_Section):
    """The embedding job: how often it looks for pending items and how many it takes at once.

    A run embeds everything pending and stops, so the interval is the wait of a study that arrives while
    the job is idle (freshness p99 2.8 s at 2 s, 0.95 s at 0.5 s; looking costs two small queries)."""

    interval_s: Annotated[float, Field(gt=0)] = 0.5
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    decode_workers: Annotated[int, Field(ge=1, le=64)] = 2


class ModelSettings(_Section):
    """Which MMDL model directory to load (empty: the shipped one) and on which device."""

    path: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


class QuerySettings(_Section):
    """Defaults of the similar-case query, which a query can override within the limits."""

    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    max_top_k: Annotated[int, Field(ge=1, le=1000)] = 100
    min_score: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.0
    exclude_same_patient: bool = False
    # How many of the most similar studies a search looks through for answers that pass its filters (findings,
    # minimum score, same patient): bounds the time of a filter that matches few or no studies.
    search_depth: Annotated[int, Field(ge=1, le=1_000_000)] = 2_000

    @model_validator(mode="after")
    def _k_within_limit(self) -> QuerySettings:
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k ({self.top_k}) must not exceed max_top_k ({self.max_top_k})")
        if self.search_depth <= self.max_top_k:
            raise ValueError(f"search_depth ({self.search_depth}) must exceed max_top_k ({self.max_top_k})")
        return self


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")  # RFC 1123 labels, dot-separated


def _check_source(value: str) -> str:
    """An allowed source: an IP address, a network in CIDR notation (no host bits set) or a host name."""
    text = value.strip()
    if "/" in text:
        try:
            ipaddress.ip_network(text)
        except ValueError as error:
            raise ValueError(f"not a network in CIDR notation ({error})") from None
        return text
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(text) or text.replace(".", "").isdigit():
        raise ValueError("must be an IP address, a CIDR network (10.1.2.0/24) or a host name")
    return text


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) names this machine's loopback interface."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Hl7Settings(_Section):
    """The MLLP listener for HL7 v2 ORU^R01 reports from the RIS.

    ``allowed_hosts`` lists the peers admitted; empty admits loopback peers only, so listening beyond
    loopback with an empty list would admit nobody from the network and is refused at load."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 2575
    allowed_hosts: list[Annotated[str, AfterValidator(_check_source)]] = []
    accession_field: Literal["OBR-3", "OBR-18"] = "OBR-3"  # where the RIS puts the Accession Number
    max_message_kb: Annotated[int, Field(ge=1, le=65536)] = 1024
    tls: TlsSettings = TlsSettings()

    @model_validator(mode="after")
    def _sources_when_exposed(self) -> Hl7Settings:
        if self.enabled and not is_loopback(self.host) and not self.allowed_hosts:
            raise ValueError(f"host {self.host!r} listens beyond loopback: name the RIS in allowed_hosts (addresses, "
                             "host names or CIDR networks); with none only loopback peers would be accepted")
        return self


class MetricsSettings(_Section):
    """The HTTP port with /health and /metrics (Prometheus text)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 9108


class WebSettings(_Section):
    """The HTTP server: the similar-cases page, its JSON, thumbnails, the reference-sheet request, DICOMweb.

    It serves every stored study, so beyond loopback it needs authentication unless the admin says otherwise."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8080
    tls: TlsSettings = TlsSettings()  # HTTPS with these files, same keys as [tls]
    auth: Literal["none", "basic", "token"] = "none"
    allow_unauthenticated: bool = False  # true: auth = "none" on a host beyond loopback (a trusted network only)
    username: str = ""  # auth = "basic"
    password: str = ""  # auth = "basic"
    token: str = ""  # auth = "token": clients send "Authorization: Bearer <token>"
    thumbnail_size: Annotated[int, Field(ge=32, le=1024)] = 256
    ohif_url: str = ""  # OHIF's base URL (its /viewer opens the pair); empty: no OHIF link
    stone_url: str = ""  # Stone Web Viewer's base URL (the folder of its index.html); empty: no link
    weasis_dicomweb_url: str = ""  # the DICOMweb root Weasis retrieves from; empty: no Weasis link

    @model_validator(mode="after")
    def _usable(self) -> WebSettings:
        problems = []
        if self.auth == "basic" and not (self.username and self.password):
            problems.append("auth 'basic' needs username and password")
        if ":" in self.username:
            problems.append("username must not contain ':'")
        if self.auth == "token" and len(self.token) < 16:
            problems.append("auth 'token' needs a token of at least 16 characters")
        if self.enabled and self.auth == "none" and not is_loopback(self.host) and not self.allow_unauthenticated:
            problems.append(f"host {self.host!r} listens beyond loopback without authentication: set auth to "
                            "'basic' or 'token' (or allow_unauthenticated = true on a trusted network)")
        for key in ("ohif_url", "stone_url", "weasis_dicomweb_url"):
            value = getattr(self, key)
            if value and not re.match(r"^https?://[^\s\"<>]+$", value):
                problems.append(f"{key} must be an http(s) URL without spaces or quotes, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BackfillSettings(_Section):
    """`mmdl-node backfill`: where the archive is, and how gently to crawl it."""

    source: Literal["orthanc", "dimse"] = "orthanc"
    orthanc_url: str = "http://127.0.0.1:8042"  # Orthanc REST API (source = "orthanc")
    orthanc_username: str = ""
    orthanc_password: str = ""
    orthanc_node_modality: str = "mmdl"  # the node's entry in Orthanc's DicomModalities
    pacs: Peer | None = None  # source = "dimse": the PACS to C-FIND, which must know the node as a move destination
    modalities: list[Annotated[str, Field(pattern=r"^[A-Z0-9_]{1,16}$")]] = ["CR", "DX"]
    studies_per_s: Annotated[float, Field(gt=0, le=1000)] = 2.0
    concurrency: Annotated[int, Field(ge=1, le=16)] = 2

    @model_validator(mode="after")
    def _pacs_for_dimse(self) -> BackfillSettings:
        if self.source == "dimse" and self.pacs is None:
            raise ValueError("source 'dimse' needs [backfill.pacs] (ae_title, host, port)")
        return self


class ReferenceSheetSettings(_Section):
    """The reference sheet: a Secondary Capture of the top-k similar cases stored into the query study."""

    enabled: bool = False  # build sheets on request (the C-FIND option, the HTTP request)
    for_every_new_study: bool = False  # and once for every new study, when it is first indexed
    new_study_max_age_h: Annotated[float, Field(gt=0)] = 24.0  # "new": first received at most this long ago
    destination: str = ""  # a [[peers]] AE title (the PACS) to C-STORE each sheet to; empty: kept in the node only
    top_k: Annotated[int, Field(ge=1, le=20)] = 8  # cases on a sheet built by the switch (a query sets its own)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_phi: bool = False


def _unique_peer_titles(peers: list[Peer]) -> list[Peer]:
    titles = [peer.ae_title for peer in peers]
    repeated = sorted({t for t in titles if titles.count(t) > 1})
    if repeated:
        raise ValueError(f"AE titles must be unique, repeated: {', '.join(repeated)}")
    return peers


class Settings(_Section):
    """Everything the node needs, validated; handed to every other package."""

    node: NodeSettings = NodeSettings()
    peers: Annotated[list[Peer], AfterValidator(_unique_peer_titles)] = []
    access: AccessSettings = AccessSettings()
    tls: TlsSettings = TlsSettings()
    catalog: CatalogSettings = CatalogSettings()
    index: IndexSettings = IndexSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    model: ModelSettings = ModelSettings()
    query: QuerySettings = QuerySettings()
    hl7: Hl7Settings = Hl7Settings()
    metrics: MetricsSettings = MetricsSettings()
    web: WebSettings = WebSettings()
    backfill: BackfillSettings = BackfillSettings()
    reference_sheet: ReferenceSheetSettings = ReferenceSheetSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _receivers_without_tls(self) -> Settings:
        if self.node.receivers and self.tls.enabled:
            raise ValueError("node.receivers needs tls.enabled = false: a TLS connection cannot be handed to a "
                             "receiver process")
        return self

    @model_validator(mode="after")
    def _sheet_destination_is_a_peer(self) -> Settings:
        destination = self.reference_sheet.destination
        if destination and self.peer(destination) is None:
            raise ValueError(f"reference_sheet.destination: {destination!r} is not among [[peers]]")
        return self

    @property
    def catalog_url(self) -> str:
        return self.catalog.url or f"sqlite:///{self.node.data_dir / 'catalog.sqlite3'}"

    def peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)
