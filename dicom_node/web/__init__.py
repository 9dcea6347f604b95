"""What the node shows people over HTTP: the similar-cases page, DICOMweb, rendered images."""
