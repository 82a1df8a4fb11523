"""Edge runtime: generate text from an edgelm ONNX export with onnxruntime, tokenizers and numpy.

Imports neither torch nor transformers, so an edge app installs only the base package:

    from edgelm.runtime import Generator
    gen = Generator.from_pretrained("out/export-int8")
    print(gen.generate("What is 12 * 7?", max_new_tokens=64))
"""

from edgelm.runtime.chat_template import ChatTemplateError, render_chat_template
from edgelm.runtime.detokenize import IncrementalDecoder, StopStringFilter
from edgelm.runtime.decoders import BufferKVCache, KVCache
from edgelm.runtime.generator import Generator
from edgelm.runtime.manifest import ExportManifest, read_manifest
from edgelm.runtime.sampling import SamplingSettings
from edgelm.runtime.session import PROVIDER_ALIASES, open_session, resolve_providers
from edgelm.runtime.static import StaticGenerator

__all__ = [
    "BufferKVCache",
    "ChatTemplateError",
    "ExportManifest",
    "Generator",
    "IncrementalDecoder",
    "KVCache",
    "PROVIDER_ALIASES",
    "SamplingSettings",
    "StaticGenerator",
    "StopStringFilter",
    "open_session",
    "read_manifest",
    "render_chat_template",
    "resolve_providers",
]
