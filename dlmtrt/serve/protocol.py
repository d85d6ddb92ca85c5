"""Request bodies of the OpenAI-compatible endpoints, the diffusion extensions, and OpenAI-shaped errors.

Bodies are strict: a wrong type is a 400 (no silent "5" -> 5), an unknown field is a 400 (a misspelt extension
field would otherwise be ignored), and OpenAI fields this server cannot honour are accepted only at their
neutral value (`echo` false, penalties 0, ...), so that a client is never answered something other
than what it asked for.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool = False


class DiffusionFields(BaseModel):
    """The diffusion extensions, shared by both endpoints. Unset fields take the model family's defaults
    (runtime/families/: Dream's `diffusion_generate`, LLaDA's `generate`), exactly as `dlmtrt generate`."""

    model_config = ConfigDict(extra="forbid")

    steps: Int | None = Field(None, description="dlmtrt: denoising steps [default: the family's, Dream 512, LLaDA 128].")
    block_length: Int | None = Field(
        None, description="dlmtrt: LLaDA's semi-autoregressive block (default 128, or the whole answer when shorter); "
                          "Dream: Fast-dLLM block decoding with this block length (default off).")
    policy: Str | None = Field(
        None, description="dlmtrt: cache policy and modifiers, as `dlmtrt generate --policy` "
                          "(none, decode, greedy, prefill, pd, block, dual, adaptive, delayed; "
                          "e.g. 'dual+parallel:threshold=0.9') [default: the server's --policy].")
    alg: Str | None = Field(None, description="dlmtrt, Dream: unmasking order: origin | maskgit_plus | topk_margin | "
                                              "entropy [default: origin, as upstream].")
    alg_temp: Float | None = Field(None, description="dlmtrt, Dream: temperature of the confidence-based order.")
    eps: Float | None = Field(None, description="dlmtrt, Dream: final timestep of the schedule [default 1e-3].")
    top_k: Int | None = Field(None, description="dlmtrt, Dream: keep the k largest logits (0 = off) [default 50].")
    remasking: Str | None = Field(None, description="dlmtrt, LLaDA: low_confidence | random [default low_confidence]; "
                                                    "SDAR: low_confidence_static | low_confidence_dynamic | sequential "
                                                    "[default low_confidence_dynamic].")
    confidence_threshold: Float | None = Field(None, description="dlmtrt, SDAR: low_confidence_dynamic commits every "
                                                                 "token above it [default 0.85].")
    cfg_scale: Float | None = Field(None, description="dlmtrt, LLaDA: classifier-free guidance scale [default 0].")
    constraints: Str | list[Str] | dict[str, Str] | None = Field(
        None, description="dlmtrt: tokens pinned at answer positions and kept there, Prophet's "
                          "form: 'POS:TEXT|POS:TEXT' (POS from 0; TEXT tokenized with a leading space), a list of "
                          "such strings, or an object {\"POS\": \"TEXT\"}.")
    answer_start: Int | None = Field(
        None, description="dlmtrt, policy +prophet: the answer position where its 5-token gap span starts "
                          "[default: 2 after the last constraint, as Prophet's eval_llada.py].")
    dlmtrt_canvas: Bool = Field(False, description="dlmtrt, streaming only: after every step also send an "
                                                   "`event: dlmtrt` with the whole canvas (mask positions null).")

    # OpenAI fields every endpoint shares
    model: Str | None = Field(None, description="The served model's id (GET /v1/models); omitted = that model.")
    max_tokens: Int | None = Field(None, description="Tokens to generate, the diffusion canvas' answer length "
                                                     "(LLaDA: gen_length) [default: the family's, Dream 20, LLaDA 128].")
    temperature: Float | None = Field(None, description="0 is greedy [default: the family's: Dream 1.0 (samples, "
                                                        "as upstream), LLaDA 0].")
    top_p: Float | None = Field(None, description="Dream: nucleus sampling threshold in (0, 1] [default off].")
    seed: Int | None = Field(None, description="Seed of this request's random draws [default 0, as `dlmtrt generate`].")
    stream: Bool = False
    stream_options: StreamOptions | None = None
    n: Int | None = Field(None, description="Choices per prompt (up to the server's --max-choices); choice c of a "
                                            "prompt is drawn with seed + c, so greedy requests give n equal choices "
                                            "[default 1].")
    stop: Str | list[Str] | None = Field(None, description="Not supported yet: only null.")
    presence_penalty: Float | None = Field(None, description="Only 0.")
    frequency_penalty: Float | None = Field(None, description="Only 0.")
    logit_bias: dict[str, Float] | None = Field(None, description="Only empty.")
    user: Str | None = None

    # OpenAI fields accepted only at a neutral value: field -> (the neutral values, why another is refused)
    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        "stop": ((None, [], ""), "stop sequences are not supported yet; the answer ends at the model's EOS"),
        "presence_penalty": ((None, 0), "presence_penalty is not supported (only 0)"),
        "frequency_penalty": ((None, 0), "frequency_penalty is not supported (only 0)"),
        "logit_bias": ((None, {}), "logit_bias is not supported"),
    }

    @property
    def choices(self) -> int:
        """`n`, the choices per prompt (1 when unset)."""
        return 1 if self.n is None else self.n

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for OpenAI fields set to something this server does not do."""
        return [(f, why) for f, (neutral, why) in self.NEUTRAL.items() if getattr(self, f) not in neutral]


class CompletionRequest(DiffusionFields):
    prompt: Str | list[Str] = Field(..., description="Text, or a list of texts (one choice each).")
    echo: Bool = Field(False, description="Only false.")
    suffix: Str | None = Field(None, description="Only null.")
    logprobs: Int | None = Field(None, description="Only null.")
    best_of: Int | None = Field(None, description="Only 1.")

    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        **DiffusionFields.NEUTRAL,
        "echo": ((False,), "echo is not supported"),
        "suffix": ((None, ""), "suffix (insertion) is not supported yet"),
        "logprobs": ((None,), "logprobs are not supported"),
        "best_of": ((None, 1), "best_of must be 1"),
    }


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Str | list[TextPart]
    name: Str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(DiffusionFields):
    messages: list[Message] = Field(..., description="The conversation, rendered with the tokenizer's chat template.")
    max_completion_tokens: Int | None = Field(None, description="Same as max_tokens.")
    logprobs: Bool | None = Field(None, description="Only false.")

    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        **DiffusionFields.NEUTRAL, "logprobs": ((None, False), "logprobs are not supported")}
