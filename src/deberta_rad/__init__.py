"""DeBERTa-RAD: distil an LLM (or rule) teacher's chest X-ray report labels into a compact encoder."""

__version__ = "0.1.0"
