"""The reference (transformers DiffusionGemma) in the backend's shape, and the reference `generate` with
injected noise.

`ReferenceModel` / `ReferenceSequence` implement the same contract as the llama.cpp backend
(prefill / denoise / commit / truncate / n_past) with the real torch model, calling it exactly as
`DiffusionGemmaGenerationMixin.generate` does (same position ids, masks, self-conditioning input), so the
dglocal driver can be checked against `reference_generate` now and the same tests reused on the backend.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref_gen

from dglocal.generation.sampler import inverse_cdf


# A bijective character-level "tokenizer" for tiny vocabularies: id t <-> chr(t) (ASCII text is ids < 128).
def _detok(tokens) -> str:
    return "".join(chr(int(t)) for t in tokens)


def _tok(text: str) -> list[int]:
    return [ord(c) for c in text]


@dataclass
class Denoised:
    argmax: np.ndarray  # int32[C]
    sampled: np.ndarray | None  # int32[C]; None without uniforms
    entropy: np.ndarray  # float32[C]
    logits: np.ndarray | None = None  # float32[C, V] (processed: raw / T)


class ReferenceModel:
    """Model-level contract over a `DiffusionGemmaForBlockDiffusion` (float32, eval)."""

    def __init__(self, model, *, n_ctx: int = 1024, eos_ids=(1,), metadata=None):
        self.torch_model = model
        self.n_ctx = n_ctx
        self.eos_ids = tuple(eos_ids)
        self.n_vocab = model.config.text_config.vocab_size
        self.canvas_length = model.config.canvas_length
        self.metadata = dict(metadata or {})

    def sequence(self) -> ReferenceSequence:
        return ReferenceSequence(self)

    def encode_batch(self, items, *, all_logits: bool = False) -> None:
        """Model.encode_batch: (sequence, tokens) pairs, each encoded on its own."""
        for seq, tokens in items:
            seq.prefill(tokens)

    def denoise_batch(self, requests, *, return_logits: bool = False) -> list:
        """Model.denoise_batch: (sequence, canvas, temperature, uniforms, self_condition, filters), each on its own;
        the reference's generate has no filters (top-k and the like), so none may be asked for."""
        out = []
        for seq, canvas, t, u, sc, *filters in requests:
            if filters and filters[0] is not None:
                raise NotImplementedError("the reference generate has no denoise filters")
            out.append(seq.denoise(canvas, temperature=t, uniforms=u, self_condition=sc, return_logits=return_logits))
        return out

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        bos = self.torch_model.config.text_config.bos_token_id
        return ([bos] if add_special else []) + _tok(text)

    def detokenize(self, tokens) -> str:
        return _detok(tokens)


class ReferenceSequence:
    """One KV-cache sequence: encoder prefill into a DynamicCache, decoder denoise over a canvas."""

    def __init__(self, model: ReferenceModel):
        self.model = model
        self.tm = model.torch_model
        self.cache = DynamicCache(config=self.tm.config.get_text_config(decoder=True))
        self.tokens: list[int] = []
        self._sc = None  # processed logits of the previous denoise: the reference's self_conditioning_logits
        self._snapshots = [(0, copy.deepcopy(self.cache))]  # for truncate: (n_past, cache) after each prefill
        self.n_encoded = 0  # tokens its encoder passes appended (Sequence.n_encoded), the tests assert on
        self.n_denoise = 0

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def prefill(self, tokens) -> None:
        self._encode(tokens)
        self.n_encoded += len(tokens)

    def commit(self, tokens) -> None:
        self.prefill(tokens)

    def prefill_images(self, tokens, pixel_values, image_position_ids) -> None:
        """Encode tokens holding image_token_id runs with the images' pixels, as generate's prefill does (the
        vision tower, the image mask of use_bidirectional_attention="vision")."""
        self._encode(tokens, dict(pixel_values=pixel_values, image_position_ids=image_position_ids))
        self.n_encoded += len(tokens)

    @torch.no_grad()
    def _encode(self, tokens, images: dict | None = None) -> None:
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        ids = torch.tensor([tokens], dtype=torch.long)
        mm = (ids == self.tm.config.image_token_id).long() if images else None
        cur_len = self.n_past + len(tokens)
        # as generate's _prepare_encoder_inputs + step 1.a
        position_ids = torch.arange(self.n_past, cur_len, dtype=torch.int32).unsqueeze(0)
        attention_mask = torch.ones((1, cur_len), dtype=torch.bool)
        dummy = torch.empty((1, len(tokens), 0), dtype=self.tm.dtype)
        mask_mapping = self.tm.model.encoder.create_masks_for_generate(
            config=self.tm.config, inputs_embeds=dummy, attention_mask=attention_mask,
            past_key_values=self.cache, position_ids=position_ids, mm_token_type_ids=mm,
        )
        out = self.tm.model.encoder(
            input_ids=ids, attention_mask=mask_mapping, past_key_values=self.cache, position_ids=position_ids,
            **(images or {}),
        )
        self.cache = out.past_key_values
        self.last_hidden = out.last_hidden_state  # encoder_logits_of turns it into next-token logits
        self.tokens += tokens
        self._snapshots.append((self.n_past, copy.deepcopy(self.cache)))

    def release(self) -> None:
        """Model's sequences are leases; the reference's are independent caches: nothing to give back."""

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"truncate({n}) with {self.n_past} cached tokens")
        if n == self.n_past:
            return
        # sliding-window layers of a DynamicCache cannot be cropped: restore a snapshot, re-encode the rest
        kept, cache = max((s for s in self._snapshots if s[0] <= n), key=lambda s: s[0])
        self._snapshots = [s for s in self._snapshots if s[0] <= kept]
        rest = self.tokens[kept:n]
        self.cache, self.tokens = copy.deepcopy(cache), self.tokens[:kept]
        self._encode(rest)  # the harness's own cost: not counted

    def rewind(self, n: int) -> int:
        """Sequence.rewind: the reference keeps every key, so it always continues from n itself."""
        self.truncate(n)
        return n

    @torch.no_grad()
    def denoise(self, canvas, *, temperature, uniforms=None, self_condition=True, return_logits=False):
        canvas = torch.as_tensor(np.asarray(canvas, dtype=np.int64)).unsqueeze(0)
        C = canvas.shape[1]
        if self_condition and self._sc is None:
            raise RuntimeError("self_condition=True without a previous denoise")
        # as generate's _prepare_denoiser_inputs + _denoising_step
        decoder_attention_mask = torch.ones((1, self.n_past + C), dtype=torch.bool)
        mask_mapping = self.tm.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.tm.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=self.cache,
            decoder_attention_mask=decoder_attention_mask,
        )
        position_ids = torch.arange(self.n_past, self.n_past + C, dtype=torch.int32).unsqueeze(0)
        raw = self.tm(
            decoder_input_ids=canvas, self_conditioning_logits=self._sc if self_condition else None,
            decoder_attention_mask=mask_mapping, past_key_values=self.cache, decoder_position_ids=position_ids,
        ).logits
        # LinearTemperatureScheduleLogitsProcessor: float32 logits / float32 T
        processed = raw / torch.tensor(temperature, dtype=torch.float32)
        self._sc = processed.to(self.tm.model.decoder.embed_tokens.weight.dtype)
        self.n_denoise += 1

        logits = processed[0].double().numpy()
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        probs = np.exp(logp)
        return Denoised(
            argmax=processed[0].argmax(-1).numpy().astype(np.int32),
            sampled=None if uniforms is None else inverse_cdf(probs, uniforms),
            entropy=(-(probs * logp).sum(-1)).astype(np.float32),
            logits=processed[0].numpy().copy() if return_logits else None,
        )


@torch.no_grad()
def head_logits(model, hidden) -> np.ndarray:
    """The tied LM head and the final softcap over encoder hidden states [1, n, H]: logits [n, V]."""
    cap = model.config.get_text_config().final_logit_softcapping
    return (torch.tanh(model.lm_head(hidden)[0] / cap) * cap).numpy()


@torch.no_grad()
def encoder_logits(model, tokens) -> np.ndarray:
    """The reference encoder with the tied LM head and the final softcap: next-token logits [n, V] for every
    position of `tokens` (the autoregressive view of the weights, what `prefill(logits_last=True)` returns)."""
    hidden = model.model.encoder(input_ids=torch.tensor([list(tokens)])).last_hidden_state
    cap = model.config.get_text_config().final_logit_softcapping
    return (torch.tanh(model.lm_head(hidden)[0] / cap) * cap).numpy()


@contextlib.contextmanager
def injected_noise(noise, n_vocab):
    """Route the reference sampler's randomness through `noise`: canvas init / re-noise (`torch.randint` in
    EntropyBoundSampler.initialize_canvas) and the categorical draw (`torch.multinomial`, inverse CDF)."""

    def initialize_canvas(self, batch_size, device):
        assert batch_size == 1
        return torch.as_tensor(noise.tokens(self.canvas_length), dtype=torch.long).view(1, -1)

    def multinomial(probs, num_samples):
        assert num_samples == 1 and probs.shape[-1] == n_vocab
        u = noise.uniforms(probs.shape[0])
        return torch.as_tensor(inverse_cdf(probs.double().numpy(), u), dtype=torch.long).view(-1, 1)

    saved = ref_gen.EntropyBoundSampler.initialize_canvas, torch.multinomial
    ref_gen.EntropyBoundSampler.initialize_canvas, torch.multinomial = initialize_canvas, multinomial
    try:
        yield
    finally:
        ref_gen.EntropyBoundSampler.initialize_canvas, torch.multinomial = saved


class _StepCounter:
    """A draft-capable streamer: counts decoder forwards per canvas."""

    def __init__(self):
        self.steps, self._n, self._prompt_seen = [], 0, False

    def put(self, value):
        if self._prompt_seen:
            self.steps.append(self._n)
            self._n = 0
        self._prompt_seen = True

    def put_draft(self, value):
        self._n += 1

    def end(self):
        pass


def reference_generate(model, prompt, noise, **generate_kwargs) -> tuple[list[int], list[int]]:
    """Run the reference `generate` on `prompt` with `noise`. Returns (generated tokens, whole canvases, padded
    after EOS with pad_token_id as the reference does; steps per canvas)."""
    counter = _StepCounter()
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with injected_noise(noise, model.config.text_config.vocab_size), torch.no_grad():
        out = model.generate(ids, streamer=counter, **generate_kwargs)
    return out.sequences[0, len(prompt):].tolist(), counter.steps
