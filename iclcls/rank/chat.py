"""Chat ranking: the LM reads the prompt as chat messages (images as data URLs, ManyICL's
layout) and answers with one of the shortlisted labels.

Where the LM exposes ``score_chat`` (the transformers VLM backend) every candidate is scored
as the reply (its log-likelihood, images in the prompt) and the candidates are ranked by it.
Else constrained where the backend can (``chat(..., choices=...)``), so the answer is always a
candidate; otherwise the free answer
is mapped exactly or case-insensitively, and an unmappable one falls back to retriever
order, flagged in the trace. The chosen label comes first, the other candidates follow in
retriever order. The classifier uses this ranker for any batch with images when its own
ranker reads text only.
"""

from __future__ import annotations

import inspect

import numpy as np

from iclcls.rank.base import RANKERS, BaseRanker, RankContext, Ranking
from iclcls.rank.query_batch import BatchedGenerativeRanker, collect_answers


def accepts_choices(lm: object) -> bool:
    try:
        return "choices" in inspect.signature(lm.chat).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        return False


@RANKERS.register("chat")
class ChatRanker(BaseRanker):
    reads_images = True

    def __init__(self, *, max_tokens: int = 16, label_token_reserve: int = 32, scored: bool = True) -> None:
        self.max_tokens = max_tokens
        self.scored = scored  # rank every candidate by its log-likelihood where the LM has score_chat
        self.label_token_reserve = label_token_reserve

    def rank(self, ctx: RankContext) -> list[Ranking]:
        lm = ctx.lm
        if lm is None:
            raise ValueError("the chat ranker needs an LM")
        count = getattr(lm, "count_chat_tokens", None)
        budget = lm.context_window - max(self.label_token_reserve, self.max_tokens)
        constrained = accepts_choices(lm)
        scorer = getattr(lm, "score_chat", None) if self.scored else None
        out = []
        for i, (q, cands) in enumerate(zip(ctx.queries, ctx.candidates)):
            demo_ids = ctx.prompts[i].demonstrations if i < len(ctx.prompts) else []
            rp = ctx.builder.build_messages(
                q.example, demo_ids, ctx.pool.examples, cands.labels, count_tokens=count, budget=budget if count is not None else None
            )
            assert rp.messages is not None  # build_messages writes them
            verbal = {ctx.builder.verbalize(lab): lab for lab in cands.labels}
            if scorer is not None:  # every candidate's log-likelihood as the reply: a full ranking
                lp = np.array([float(np.sum(t)) for t in scorer([rp.messages], list(verbal))[0]])
                order = np.argsort(-lp, kind="stable")
                labels, scores = [cands.labels[j] for j in order], lp[order]
                answer = ctx.builder.verbalize(labels[0])
                chosen: str | None = labels[0]
            else:
                if constrained:
                    answer = lm.chat([rp.messages], choices=list(verbal), max_tokens=self.max_tokens)[0]  # type: ignore[call-arg]  # an optional LM argument (not in BaseLM), checked above
                else:
                    answer = lm.chat([rp.messages], max_tokens=self.max_tokens, stop=["\n"])[0]
                chosen = self._map(answer, verbal)
                rest = [lab for lab in cands.labels if lab != chosen]
                labels = ([chosen] if chosen else []) + rest
                scores = np.array(([1.0] if chosen else []) + [-1.0 - j for j in range(len(rest))])
            trace = {
                "rank": "chat",
                "chat_answer": answer,
                "chat_constrained": constrained or scorer is not None,
                "chat_scored": scorer is not None,
                "chat_prompt_tokens": rp.tokens,
                "chat_demonstrations": len(rp.demonstrations),
                **rp.trace,
            }
            if not chosen:
                trace["chat_fallback"] = "retriever order"
            out.append(Ranking(labels, scores, trace))
        return out

    @staticmethod
    def _map(answer: str, verbal: dict[str, str]) -> str | None:
        text = answer.strip().split("\n")[0].strip().strip(".\"'` ")
        if text in verbal:
            return verbal[text]
        if text in verbal.values():
            return text
        lower = {k.lower(): v for k, v in verbal.items()} | {v.lower(): v for v in verbal.values()}
        return lower.get(text.lower())


@RANKERS.register("batched_chat")
class BatchedChatRanker(BatchedGenerativeRanker):
    """ManyICL's query batching with images: ``queries_per_call`` queries that share their
    demonstrations go in one chat message (:meth:`PromptBuilder.batch_messages`); the LM
    answers ``N: label`` lines, mapped exactly or case-insensitively (an image embedder cannot
    embed a written answer); unanswered queries are asked again in smaller batches, then fall
    back to retriever order, as in ``batched_generative``."""

    reads_images = True

    def _ask(self, ctx: RankContext, members: list[int]) -> tuple[dict[int, list], dict[int, str]]:
        chunks = [members[i : i + self.queries_per_call] for i in range(0, len(members), self.queries_per_call)]
        b = ctx.builder
        convs = []
        for ch in chunks:
            demos = [ctx.pool.examples[i] for i in ctx.prompts[ch[0]].demonstrations]
            cands: list[str] = []
            for qi in ch:
                cands += [lab for lab in ctx.candidates[qi].labels if lab not in cands]
            convs.append(b.batch_messages([ctx.queries[qi].example for qi in ch], demos, cands))
        longest = max(len(ch) for ch in chunks)
        assert ctx.lm is not None  # rank() checked it
        texts = ctx.lm.chat(convs, max_tokens=self.max_tokens_per_query * longest + 4, temperature=0.0)
        verbal = {b.verbalize(lab): lab for lab in ctx.pool.labels}  # once, not per answer

        def map_answer(answer: str) -> list | None:
            lab = ChatRanker._map(answer, verbal)
            return [(lab, 1.0, "exact")] if lab else None

        return collect_answers(chunks, texts, map_answer)
