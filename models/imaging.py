"""Image decoding and the one preprocessing step shared by training and inference.

Every image enters the models as a 2-D float32 array in [0, 1], MONOCHROME2 (bright = dense),
whether it came from DICOM pixel data or from a PNG/JPEG file; ``to_model_input`` then turns
such arrays into the backbone's input tensor with parameters (``Preprocessing``) that are
saved with the weights.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from models.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the ones Pillow uses for RGB -> L, so DICOM and PNG colour agree.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# What pydicom's decoders hand back as RGB (YBR_* are converted to RGB while decoding).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
_PROBE = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max], dtype=np.int64)


def read_dicom_image(source: str | Path | bytes | Dataset) -> np.ndarray:
    """Decode the first frame of a DICOM image to 2-D float32 in [0, 1], MONOCHROME2.

    The modality LUT (rescale) and the dataset's first VOI LUT or window are applied; without
    either, the frame's full value range is used. MONOCHROME1 is inverted, colour becomes
    luminance. Files without a Part-10 header are read too. A Dataset passed in gets a Transfer
    Syntax UID set in its file meta when it has none. Any failure raises ModelError.
    """
    try:
        return _dataset_to_unit(_as_dataset(source))
    except ModelError:
        raise
    except Exception as exc:  # A malformed element only fails when pydicom converts its value.
        raise ModelError(f"malformed DICOM image attributes: {exc}") from exc


def load_image(path: str | Path) -> np.ndarray:
    """Read a DICOM (recognised by content), PNG or JPEG file as 2-D float32 in [0, 1].

    PNG/JPEG values are scaled by their bit depth (8 or 16 bits), colour becomes luminance.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        raise ModelError(f"cannot read image file {str(path)!r}: {exc.strerror or exc}") from exc
    if head[128:132] == b"DICM":
        return read_dicom_image(path)
    try:
        with Image.open(path) as picture:
            return _picture_to_unit(picture)
    except UnidentifiedImageError:
        pass  # Not a picture format Pillow knows: a DICOM file without a Part-10 header, maybe.
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ModelError(f"cannot decode image file {str(path)!r}: {exc}") from exc
    try:
        return read_dicom_image(path)
    except ModelError as exc:
        raise ModelError(f"{str(path)!r} is neither a PNG/JPEG nor a readable DICOM image ({exc})") from exc


@dataclass(frozen=True)
class Preprocessing:
    """How [0, 1] grey images become backbone input: saved beside the weights they belong to.

    ``channels`` copies of the image are resized (stretched) to ``size`` x ``size`` and each is
    normalised as (x - mean) / std. The ImageNet default suits torchvision DenseNets;
    ``torchxrayvision()`` gives that library's 1-channel [-1024, 1024] convention.
    """

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ModelError(f"preprocessing size must be at least 32 pixels, got {self.size}")
        if self.channels not in (1, 3):
            raise ModelError(f"preprocessing channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ModelError(
                f"preprocessing mean/std need {self.channels} values, got {len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ModelError(f"preprocessing std must be positive, got {self.std}")

    @classmethod
    def torchxrayvision(cls, size: int = 224) -> Preprocessing:
        """torchxrayvision's input: one channel, [0, 1] mapped linearly onto [-1024, 1024]."""
        return cls(size=size, channels=1, mean=(0.5,), std=(1.0 / 2048.0,))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the model bundle."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """Inverse of to_dict; a bad or incomplete record raises ModelError."""
        try:
            return cls(
                size=int(values["size"]),
                channels=int(values["channels"]),
                mean=tuple(float(v) for v in values["mean"]),
                std=tuple(float(v) for v in values["std"]),
            )
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"bad preprocessing record {values!r}: {exc!r}") from exc


def to_model_input(images: Sequence[np.ndarray], preprocessing: Preprocessing) -> torch.Tensor:
    """Stack 2-D [0, 1] images into a normalised (n, channels, size, size) float32 CPU tensor."""
    import torch  # here, not above: the node decodes and renders images without loading torch
    from torch.nn import functional as F

    if len(images) == 0:
        raise ModelError("no images to preprocess")
    size = preprocessing.size
    batch = torch.empty((len(images), 1, size, size), dtype=torch.float32)
    for i, image in enumerate(images):
        array = np.asarray(image)
        if array.ndim != 2 or min(array.shape) < 1:
            raise ModelError(f"image {i} must be a non-empty 2-D array, got shape {array.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        batch[i] = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    batch = batch.clamp_(0.0, 1.0).expand(-1, preprocessing.channels, -1, -1)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (batch - mean) / std


def _dataset_to_unit(ds: Dataset) -> np.ndarray:
    """read_dicom_image's work on a parsed dataset."""
    if len(ds) == 0:
        raise ModelError("not a DICOM file: no data element could be read")
    if "PixelData" not in ds:
        raise ModelError("no Pixel Data in the DICOM dataset (not an image object, or a truncated file)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME + COLOUR:
        raise ModelError(f"unsupported Photometric Interpretation {photometric or '(missing)'}")
    frame = _decode_first_frame(ds)
    if photometric in COLOUR:
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ModelError(f"colour image decoded to shape {frame.shape}, expected rows x columns x 3")
        bits = int(ds.get("BitsStored", 8))
        return _clip01(frame.astype(np.float64) @ LUMA_WEIGHTS / (2**bits - 1))
    if frame.ndim != 2:
        raise ModelError(f"{photometric} image decoded to shape {frame.shape}, expected rows x columns")
    image = _monochrome_to_unit(frame, ds)
    return 1.0 - image if photometric == "MONOCHROME1" else image


def _as_dataset(source: str | Path | bytes | Dataset) -> Dataset:
    """Parse the source (header or not) and make sure a transfer syntax is known."""
    if isinstance(source, Dataset):
        ds = source
    else:
        target: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            ds = pydicom.dcmread(target, force=True)
        except FileNotFoundError as exc:
            raise ModelError(f"DICOM file not found: {str(source)!r}") from exc
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"not a readable DICOM file: {exc}") from exc
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = _syntax_from_encoding(ds)
    return ds


def _syntax_from_encoding(ds: Dataset) -> UID:
    """The uncompressed transfer syntax matching the encoding pydicom detected (Implicit LE by default)."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is False:
        return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    return ImplicitVRLittleEndian


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    """Decode frame 0 with whichever pydicom/pylibjpeg plugin handles the transfer syntax."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    name = syntax.name if syntax.is_valid else str(syntax)
    try:
        return pixel_array(ds, index=0)
    except NotImplementedError as exc:
        raise ModelError(f"no decoder available for transfer syntax {name}: {exc}") from exc
    except (AttributeError, KeyError) as exc:
        raise ModelError(f"DICOM image lacks a required pixel description attribute: {exc}") from exc
    except Exception as exc:  # The decoders raise RuntimeError, ValueError, OSError, ... on bad data.
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ModelError(f"{name} decoder failed: {reason}") from exc


def _monochrome_to_unit(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply modality and VOI LUTs, then map the VOI output range (or the data range) to [0, 1]."""
    try:
        values = apply_modality_lut(frame, ds)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"invalid Modality LUT / rescale attributes: {exc}") from exc
    if _has_voi(ds):
        try:
            windowed = apply_voi_lut(values, ds, index=0)
            low, high = (float(v) for v in apply_voi_lut(_PROBE, ds, index=0))
            return _scale(windowed, low, high)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, NotImplementedError) as exc:
            log.warning("ignoring an invalid VOI LUT / window (%s); using the full range", exc)
    values = values.astype(np.float64)
    return _scale(values, float(values.min()), float(values.max()))


def _has_voi(ds: Dataset) -> bool:
    """Whether the dataset carries a VOI LUT or a window that pydicom would apply."""
    sequence = ds.get("VOILUTSequence")
    has_lut = bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    return has_lut or has_window


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 1]; a constant image becomes all zeros."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return _clip01((values.astype(np.float64) - low) / (high - low))


def _clip01(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] as float32, the contract of every image this module returns."""
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def _picture_to_unit(picture: Image.Image) -> np.ndarray:
    """PNG/JPEG pixels to [0, 1] grey: 16-bit modes by 65535, everything else as 8-bit luminance."""
    if picture.mode.startswith("I;16") or picture.mode == "I":
        values = np.asarray(picture, dtype=np.float64)
        return _clip01(values / 65535.0)
    grey = picture if picture.mode == "L" else picture.convert("L")
    return np.asarray(grey, dtype=np.float32) / np.float32(255.0)
