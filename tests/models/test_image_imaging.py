"""Decoding real and synthetic DICOM/PNG/JPEG files, and the shared preprocessing step."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage

from models.errors import ModelError
from models.imaging import Preprocessing, load_image, read_dicom_image, to_model_input

RG1 = "dicom/pydicom-data_WG04_RG1"
XRV = "dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
XRV_FAKE_MONO1 = "dicom/torchxrayvision_tests/derived_not_real/Fake_MONOHR1.dcm"
NO_HEADER = "dicom/fo-dicom/CR-MONO1-10-chest"


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1) -> Dataset:
    """A minimal uncompressed image dataset (uint8/uint16 grey or uint8 RGB)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    colour = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rg1(shared_data: Path) -> dict[str, np.ndarray]:
    """The four WG04 RG1 files decoded (1955 x 1841, 15-bit MONOCHROME1)."""
    return {name: read_dicom_image(shared_data / RG1 / f"RG1_{name}.dcm") for name in ("UNCR", "UNCI", "J2KR", "J2KI")}


def test_rg1_decodes_to_unit_monochrome2(rg1: dict[str, np.ndarray]) -> None:
    image = rg1["UNCR"]
    assert image.shape == (1955, 1841) and image.dtype == np.float32
    assert 0.0 <= image.min() < 0.2 and 0.9 < image.max() <= 1.0
    # MONOCHROME2 after inversion: the lung fields (centre) are darker than the mediastinum/bone border.
    rows, cols = image.shape
    left_lung = image[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    spine = image[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    assert left_lung < spine


def test_j2k_lossless_equals_uncompressed(rg1: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(rg1["J2KR"], rg1["UNCR"])


def test_j2k_lossy_equals_its_reference_decompression(rg1: dict[str, np.ndarray]) -> None:
    # In WG04, UNCI is the reference decompression of the 10:1 irreversible J2KI stream.
    np.testing.assert_allclose(rg1["J2KI"], rg1["UNCI"], atol=1e-6)
    assert correlation(rg1["J2KI"], rg1["UNCR"]) > 0.999
    assert np.abs(rg1["J2KI"] - rg1["UNCR"]).max() > 0  # it is lossy


def test_monochrome1_and_monochrome2_versions_agree(shared_data: Path) -> None:
    original = pydicom.dcmread(shared_data / NO_HEADER, force=True)
    original.file_meta = FileMetaDataset()
    original.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    inverted = make_dataset((2**original.BitsStored - 1 - original.pixel_array).astype(np.uint16))
    inverted.BitsStored, inverted.HighBit = original.BitsStored, original.HighBit
    inverted.WindowCenter = 2**original.BitsStored - 1 - original.WindowCenter
    inverted.WindowWidth = original.WindowWidth
    as_mono1 = read_dicom_image(original)
    as_mono2 = read_dicom_image(inverted)
    assert original.PhotometricInterpretation == "MONOCHROME1"
    assert correlation(as_mono1, as_mono2) > 0.999


def test_relabelled_monochrome1_file_is_inverted(shared_data: Path) -> None:
    # Fake_MONOHR1 holds the very same JPEG bytes as the MONOCHROME2 original, relabelled MONOCHROME1.
    real = read_dicom_image(shared_data / XRV)
    fake = read_dicom_image(shared_data / XRV_FAKE_MONO1)
    assert real.shape == (1024, 1024)
    np.testing.assert_allclose(fake, 1.0 - real, atol=1e-6)


def test_file_without_part10_header(shared_data: Path) -> None:
    raw = (shared_data / NO_HEADER).read_bytes()
    assert raw[128:132] != b"DICM"
    from_path = load_image(shared_data / NO_HEADER)
    assert from_path.shape == (440, 440) and from_path.dtype == np.float32
    np.testing.assert_array_equal(read_dicom_image(raw), from_path)
    assert 0.0 <= from_path.min() and from_path.max() <= 1.0 and from_path.std() > 0.1


def test_rle_and_implicit_vr_round_trip(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / NO_HEADER, force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    expected = read_dicom_image(ds)
    implicit = to_bytes(ds)
    assert implicit[128:132] == b"DICM"
    np.testing.assert_array_equal(read_dicom_image(implicit), expected)
    ds.compress(RLELossless, ds.pixel_array)
    rle = to_bytes(ds)
    assert pydicom.dcmread(io.BytesIO(rle)).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_dicom_image(rle), expected)


def test_window_and_rescale_are_applied() -> None:
    pixels = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))
    ds = make_dataset(pixels)
    ds.BitsStored, ds.HighBit = 10, 9
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100  # values -100 .. 1880
    ds.WindowCenter, ds.WindowWidth = 500, 401  # DICOM linear window: about 300 to 700
    image = read_dicom_image(ds)
    values = pixels[0] * 2.0 - 100
    assert np.all(image[0][values < 299] == 0.0)
    assert np.all(image[0][values > 701] == 1.0)
    inside = (values > 320) & (values < 680)
    assert np.all(np.diff(image[0][inside]) > 0)
    np.testing.assert_allclose(image[0][values == 500], 0.5, atol=0.01)


def test_without_window_the_full_range_is_used() -> None:
    pixels = np.array([[100, 200], [300, 400]], dtype=np.uint16)
    np.testing.assert_allclose(read_dicom_image(make_dataset(pixels)), [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)


def test_invalid_window_falls_back_to_the_full_range(caplog: pytest.LogCaptureFixture) -> None:
    pixels = np.array([[100, 200], [300, 400]], dtype=np.uint16)
    ds = make_dataset(pixels)
    ds.WindowCenter, ds.WindowWidth = 250, 0  # a width below 1 is invalid (PS3.3 C.11.2.1.2)
    np.testing.assert_allclose(read_dicom_image(ds), [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    assert "ignoring an invalid VOI LUT / window" in caplog.text


def test_first_frame_of_multiframe() -> None:
    frames = np.stack([np.full((8, 8), 10, np.uint8), np.full((8, 8), 200, np.uint8)])
    frames[0, :4] = 250  # frame 0: top half bright
    image = read_dicom_image(make_dataset(frames, frames=2))
    assert image.shape == (8, 8)
    assert np.all(image[:4] == 1.0) and np.all(image[4:] == 0.0)


def test_colour_becomes_luminance() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green
    image = read_dicom_image(make_dataset(rgb, photometric="RGB"))
    np.testing.assert_allclose(image, 0.587, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: delattr(ds, "PixelData"), "no Pixel Data"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"), "unsupported Photometric Interpretation PALETTE COLOR"),
        (lambda ds: setattr(ds, "PixelData", b"\x00" * 10), "decoder failed"),
    ],
)
def test_bad_datasets_raise_model_error(change: object, reason: str) -> None:
    ds = make_dataset(np.zeros((16, 16), dtype=np.uint8))
    change(ds)  # type: ignore[operator]
    with pytest.raises(ModelError, match=reason):
        read_dicom_image(ds)


def test_corrupt_jpeg2000_names_the_decoder(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / RG1 / "RG1_J2KI.dcm")
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) // 8]])
    with pytest.raises(ModelError, match="JPEG 2000 .*decoder failed"):
        read_dicom_image(ds)


def test_truncated_and_junk_files_raise_model_error(shared_data: Path, tmp_path: Path) -> None:
    raw = (shared_data / NO_HEADER).read_bytes()
    with pytest.raises(ModelError, match="decoder failed: .*less than expected"):
        read_dicom_image(raw[: len(raw) // 2])
    with pytest.raises(ModelError):
        read_dicom_image((shared_data / RG1 / "RG1_J2KR.dcm").read_bytes()[:1000])
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image at all\n" * 20)
    with pytest.raises(ModelError, match="notes.txt"):
        load_image(junk)
    with pytest.raises(ModelError, match="not found"):
        read_dicom_image(tmp_path / "missing.dcm")
    with pytest.raises(ModelError, match="cannot read"):
        load_image(tmp_path / "missing.png")


def test_png_and_jpeg_files(tmp_path: Path) -> None:
    grey = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_allclose(load_image(tmp_path / "grey.png"), grey / 255.0, atol=1e-6)

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_allclose(load_image(tmp_path / "deep.png"), deep / 65535.0, atol=1e-6)

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    np.testing.assert_allclose(load_image(tmp_path / "red.png"), 76 / 255.0, atol=1 / 255.0)

    smooth = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    Image.fromarray(smooth).save(tmp_path / "smooth.jpg", quality=95)
    decoded = load_image(tmp_path / "smooth.jpg")
    assert decoded.shape == (32, 32) and decoded.dtype == np.float32
    assert np.abs(decoded - smooth / 255.0).max() < 0.05


def test_png_and_dicom_of_one_image_agree(shared_data: Path, tmp_path: Path) -> None:
    from_dicom = read_dicom_image(shared_data / XRV)
    Image.fromarray(np.round(from_dicom * 255).astype(np.uint8)).save(tmp_path / "same.png")
    np.testing.assert_allclose(load_image(tmp_path / "same.png"), from_dicom, atol=0.5 / 255 + 1e-6)


def test_to_model_input_shapes_and_normalisation() -> None:
    preprocessing = Preprocessing(size=64)
    images = [np.full((100, 80), 0.5, np.float32), np.zeros((30, 40), np.float32)]
    batch = to_model_input(images, preprocessing)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    for channel, (mean, std) in enumerate(zip(preprocessing.mean, preprocessing.std)):
        torch.testing.assert_close(batch[0, channel], torch.full((64, 64), (0.5 - mean) / std))
        torch.testing.assert_close(batch[1, channel], torch.full((64, 64), -mean / std))


def test_torchxrayvision_preprocessing_range() -> None:
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))
    batch = to_model_input([ramp, np.ones((10, 10), np.float32)], Preprocessing.torchxrayvision(size=64))
    assert batch.shape == (2, 1, 64, 64)
    assert batch[0].min().item() == pytest.approx(-1024, abs=20)
    torch.testing.assert_close(batch[1], torch.full((1, 64, 64), 1024.0))


def test_preprocessing_record_round_trip_and_validation() -> None:
    original = Preprocessing.torchxrayvision(size=128)
    assert Preprocessing.from_dict(original.to_dict()) == original
    with pytest.raises(ModelError, match="channels"):
        Preprocessing(channels=2)
    with pytest.raises(ModelError, match="bad preprocessing record"):
        Preprocessing.from_dict({"size": 224})
    with pytest.raises(ModelError, match="2-D"):
        to_model_input([np.zeros((3, 4, 4), np.float32)], Preprocessing())


def small_file(compressed: bool) -> bytes:
    """A 16 x 16 windowed image file, uncompressed or RLE, as the fuzz test's seed."""
    ds = make_dataset((np.arange(256, dtype=np.uint16).reshape(16, 16) * 16))
    ds.BitsStored, ds.HighBit = 12, 11
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    if compressed:
        ds.compress(RLELossless, ds.pixel_array)
    return to_bytes(ds)


SEEDS = {False: small_file(False), True: small_file(True)}


@settings(max_examples=80, deadline=None)
@given(
    compressed=st.booleans(),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=6),
    keep=st.floats(0.0, 1.0),
)
def test_damaged_files_decode_or_raise_model_error(compressed: bool, flips: list[tuple[int, int]], keep: float) -> None:
    data = bytearray(SEEDS[compressed])
    for position, value in flips:
        data[position % len(data)] = value
    data = data[: max(1, round(len(data) * keep))] if keep < 0.98 else data
    try:
        image = read_dicom_image(bytes(data))
    except ModelError:
        return
    assert image.ndim == 2 and image.dtype == np.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
