"""The SOP classes and transfer syntaxes the node serves."""
from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from indexer.schema import Kind

IMAGE_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
REPORT_STORAGE = (BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage)
STORAGE_KIND: dict[str, Kind] = {
    **{uid: Kind.IMAGE for uid in IMAGE_STORAGE},
    **{uid: Kind.REPORT for uid in REPORT_STORAGE},
}

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Everything the image decoder (pydicom + pylibjpeg plugins) can read; stored as received.
TRANSFER_SYNTAXES = (
    *UNCOMPRESSED,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

QUERY_RETRIEVE = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)
VERIFICATION = Verification
