"""Autoregressive sampling from a loaded model (pretrain/inference/loading.py), with a KV cache.

`generate` continues one prompt `num_samples` times, as one batch: each step turns
the logits of the last position into a token, greedily or by sampling (temperature,
then top-k, then top-p, Hugging Face's order), until `max_new_tokens`, the
end-of-document token, or the model's context (n_positions) ends it. With the
cache (pretrain/model/gpt2.py KVCache) each new token costs one position of
compute; without it the whole sequence is recomputed every step, the reference
the cache is tested and benchmarked against.

Logits are kept over the real vocabulary only: the rows that pad the embedding
to a multiple of 128 are never candidates.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from pretrain.inference.loading import LoadedModel
from pretrain.model.gpt2 import KVCache


@dataclass
class SamplingOptions:
    max_new_tokens: int = 100
    """Tokens to generate per sample, at most; the context (n_positions) may end them sooner."""
    greedy: bool = False
    """Always take the most likely token; temperature, top_k and top_p are then ignored."""
    temperature: float = 1.0
    """Logits are divided by it before sampling: below 1 sharper, above 1 flatter."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 for all."""
    top_p: float = 1.0
    """Nucleus sampling: among the fewest most likely tokens whose probability reaches top_p; 1 for all."""
    num_samples: int = 1
    """Continuations of the prompt, generated together as one batch."""
    seed: int | None = 1234
    """Seeds the sampler's own generator, so a run repeats; None draws a fresh seed."""
    stop_at_eod: bool = True
    """A sample ends at the end-of-document token (which it does not include)."""
    use_cache: bool = True
    """Keep keys and values (one position per new token); False recomputes the whole sequence each step."""

    def validate(self) -> None:
        """Raise ValueError naming the option to change."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: ask for at least 1 sample")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed={self.seed}: use a non-negative seed")
        if self.greedy:
            return
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: it must be > 0 (use greedy for the most likely token)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: use a positive k, or 0 for no top-k filtering")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: it must be in (0, 1]; 1 keeps every token")


@dataclass
class Sample:
    token_ids: list[int]
    """The new tokens, without the prompt (and without the end-of-document token that ended it)."""
    text: str
    """The new tokens decoded."""
    finish_reason: str
    """"end_of_document", "max_new_tokens", or "context_full" (n_positions reached)."""


@dataclass
class Generation:
    prompt_ids: list[int]
    samples: list[Sample]
    new_tokens: int
    """Tokens generated over all samples, end-of-document tokens included."""
    seconds: float
    """From the prompt's forward pass to the last token (model loading excluded)."""
    notes: list[str] = field(default_factory=list)
    """What was changed from the request and why (a capped length), for the user to see."""
    step_logits: list[torch.Tensor] | None = None
    """With keep_logits: the fp32 logits (num_samples, vocab_size) each token was chosen from."""

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_ids, "samples": [asdict(sample) for sample in self.samples],
                "new_tokens": self.new_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 2), "notes": self.notes}


# ---- choosing the next token ------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf for all but the k largest logits of each row (ties at the k-th are kept), (B, V) -> (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """-inf for all but the smallest set of most likely tokens whose probability reaches p, (B, V) -> (B, V).

    A token is kept when the tokens more likely than it sum to less than p, so the most
    likely token is always kept (Hugging Face's TopPLogitsWarper keeps the same set, up to the order
    of tokens tied at the cut-off).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probabilities = sorted_logits.softmax(dim=-1)
    mass_before = probabilities.cumsum(dim=-1) - probabilities  # probability of the tokens ranked above
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def choose_tokens(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row, (B, V) fp32 logits -> (B,) ids."""
    if options.greedy:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / options.temperature, options.top_k), options.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ---- the loop ----------------------------------------------------------------------------------


class Decoder:
    """Next-token logits for a batch of growing sequences, with or without a KV cache."""

    def __init__(self, loaded: LoadedModel, prompt: torch.Tensor, max_length: int, use_cache: bool):
        self.model, self.vocab_size = loaded.model, loaded.config.vocab_size
        self.sequence = prompt  # (B, T): everything so far
        self.unseen = prompt  # (B, t): the tokens the cache does not hold yet
        self.cache = KVCache.for_model(self.model, prompt.shape[0], max_length) if use_cache else None

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """(B, vocab_size) fp32 logits for the token after the sequence; padding columns are cut off."""
        if self.cache is None:
            logits = self.model(self.sequence)  # (B, T, V_padded): the whole prefix again
        else:
            logits = self.model(self.unseen, cache=self.cache)  # (B, t, V_padded): the new tokens only
        return logits[:, -1, : self.vocab_size].float()

    def append(self, tokens: torch.Tensor) -> None:
        self.unseen = tokens[:, None]  # (B, 1)
        self.sequence = torch.cat([self.sequence, self.unseen], dim=1)


def plan_length(prompt_length: int, options: SamplingOptions, n_positions: int) -> tuple[int, list[str]]:
    """How many tokens to generate: the request, capped so that prompt + new tokens <= n_positions."""
    if prompt_length >= n_positions:
        raise ValueError(f"the prompt is {prompt_length} tokens; the model reads at most n_positions="
                         f"{n_positions}, and must have room for a new token: shorten the prompt")
    room = n_positions - prompt_length
    if options.max_new_tokens <= room:
        return options.max_new_tokens, []
    return room, [f"max_new_tokens={options.max_new_tokens} capped at {room}: the {prompt_length}-token prompt "
                  f"and the new tokens together fill the model's context of n_positions={n_positions}"]


def generate(loaded: LoadedModel, prompt_ids: list[int], options: SamplingOptions,
             keep_logits: bool = False) -> Generation:
    """Continue `prompt_ids` options.num_samples times. An empty prompt starts from the
    end-of-document token, as GPT-2's unconditional samples do."""
    options.validate()
    prompt_ids = list(prompt_ids) or [loaded.tokenizer.eod_id]
    steps, notes = plan_length(len(prompt_ids), options, loaded.config.n_positions)
    generator = None
    if not options.greedy:
        generator = torch.Generator(device=loaded.device)
        if options.seed is None:
            generator.seed()  # a fresh, nondeterministic seed
        else:
            generator.manual_seed(options.seed)

    started = time.perf_counter()
    prompt = torch.tensor([prompt_ids] * options.num_samples, dtype=torch.long, device=loaded.device)  # (B, T)
    decoder = Decoder(loaded, prompt, len(prompt_ids) + steps - 1, options.use_cache)
    tokens, lengths, kept = _decode(decoder, steps, options, generator, loaded.tokenizer.eod_id, keep_logits)
    new_tokens = int(lengths.sum())  # waits for the device, so that the time is the work's
    seconds = time.perf_counter() - started

    length_reason = "max_new_tokens" if steps == options.max_new_tokens else "context_full"
    samples = []
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        ended = options.stop_at_eod and row[length - 1] == loaded.tokenizer.eod_id  # every row has >= 1 token
        ids = row[: length - 1] if ended else row[:length]
        samples.append(Sample(ids, loaded.tokenizer.decode(ids), "end_of_document" if ended else length_reason))
    return Generation(prompt_ids, samples, new_tokens, seconds, notes, kept if keep_logits else None)


def _decode(decoder: Decoder, steps: int, options: SamplingOptions, generator, eod_id: int, keep_logits: bool):
    """Up to `steps` tokens per row: (B, steps) ids, (B,) how many each row generated, kept logits."""
    B = decoder.sequence.shape[0]
    device = decoder.sequence.device
    tokens = torch.full((B, steps), eod_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    kept = []
    for step in range(steps):
        logits = decoder.next_logits()  # (B, V)
        if keep_logits:
            kept.append(logits.cpu())
        chosen = choose_tokens(logits, options, generator)  # (B,)
        tokens[:, step] = torch.where(running, chosen, eod_id)
        lengths += running
        if options.stop_at_eod:
            running &= chosen != eod_id
            if not running.any():
                break
        if step + 1 < steps:
            decoder.append(tokens[:, step])
    return tokens, lengths, kept
