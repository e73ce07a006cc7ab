"""The block-diffusion loop over a runtime Model: settings (config), the reference sampler's pieces (sampler),
one generation as a state object (loop), its events (events), request plans and prompt reuse (request), the
driver that batches generations (driver), chat templates (chat) and the high-level API (llm). Imports
dglocal.runtime and dglocal.errors only."""

from .config import GenerationConfig
from .driver import generate, generate_many, stream
from .events import BlockText, Completion, Event, Stats, Step
from .llm import LLM

__all__ = ["GenerationConfig", "LLM", "stream", "generate", "generate_many", "Event", "Step", "BlockText",
           "Completion", "Stats"]
