"""Continuous-batching scheduler: each step fills a token budget and a sequence cap, running sequences first
(decodes and unfinished prefill chunks), then waiting ones in arrival order shifted by priority (see
Sequence.sort_key). A prompt is prefilled at most `max_prefill_chunk` tokens per step (stall-free chunked prefill,
as Sarathi-Serve and vLLM v1 do): a long prompt takes a bounded share of each step, so running decodes keep their
pace and short prompts that arrive meanwhile start at once. When blocks run out the newest running sequence is
preempted and will be recomputed; a request that could never fit is refused at submission instead.

A decoding sequence with draft tokens (speculation.py) is scheduled among the decodes with its last token and the
drafts, a decode row each. Drafts only ever take room that is spare: they are cut to the step's budget, and to the
blocks the sequence holds when the free pool runs low, so speculation never preempts anyone.

A windowed model's sequence releases the blocks that slid out of its window (block_manager.py) yet keeps their table
entries, so the blocks a step needs are still counted by position; preempting it frees only the blocks it holds, and
its recompute starts over with fresh blocks (or prefix hits), chunk by chunk, releasing again as it goes."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed for it this step, its draft tokens included
    draft_token_ids: list[int] = field(default_factory=list)  # verified this step, after the sequence's tokens

    @property
    def completes_prompt(self) -> bool:
        """After this step every token of the sequence has K/V, so the next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledSeq]  # more than one new token, or a first token
    decodes: list[ScheduledSeq]  # one new token after the prompt was computed (and any drafts to verify after it)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.prefills) + sum(s.num_new_tokens for s in self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_chunk: int | None = None, max_loras: int | None = None):
        self.block_manager = block_manager
        self.max_loras = max_loras  # most distinct LoRA adapters among the running sequences (None: no adapters)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk or max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []  # sorted by Sequence.sort_key: the last is the first to be preempted
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens admitted, and how many of them were prefix-cache hits
        self.prefix_hit_tokens = 0
        self.num_admitted = 0  # sequences moved from waiting to running (the queue's drain rate)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _with_drafts(self, seq: Sequence, draft: list[int], budget: int) -> ScheduledSeq | None:
        """`seq`'s decode with as much of `draft` as the budget and the spare blocks allow (allocated), or None."""
        draft = draft[:budget - 1]
        bm = self.block_manager
        held = len(seq.block_table) * bm.block_size - seq.num_computed_tokens - 1  # draft slots needing no new block
        if len(draft) > held and bm.num_free_blocks - bm.blocks_needed(len(draft) - held) < len(self.running):
            draft = draft[:max(held, 0)]  # keep a block free per running sequence for its own next token
        if not draft or not bm.allocate(seq, 1 + len(draft)):
            return None
        return ScheduledSeq(seq, 1 + len(draft), draft)

    def schedule(self, drafts: dict[int, list[int]] | None = None) -> SchedulerOutput:
        """This step's work. `drafts` (by seq_id) are draft tokens to verify for sequences that decode."""
        budget = self.max_num_batched_tokens
        out = SchedulerOutput([], [])
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            draft = drafts.get(seq.seq_id) if drafts else None
            if draft and seq.num_computed_tokens == seq.num_tokens - 1:
                scheduled = self._with_drafts(seq, draft, budget)
                if scheduled is not None:
                    budget -= scheduled.num_new_tokens
                    out.decodes.append(scheduled)
                    continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget, self.max_prefill_chunk)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                budget -= num_new
                scheduled = ScheduledSeq(seq, num_new)
                is_decode = num_new == 1 and seq.num_output_tokens > 0 and seq.num_computed_tokens == seq.num_tokens - 1
                (out.decodes if is_decode else out.prefills).append(scheduled)
        if out.num_preempted:  # memory is tight: admit nothing new this step
            return out
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            leader = seq.group_leader
            if leader is not None and not leader.is_finished and leader.num_computed_tokens < leader.num_prompt_tokens:
                skipped.append(self.waiting.pop(0))  # wait for the leader's prompt blocks, let others pass
                continue
            if self._lora_full(seq):
                skipped.append(self.waiting.pop(0))  # its adapter waits for a slot; other adapters' requests pass
                continue
            prefix = self.block_manager.match_prefix(seq)
            num_new = min(seq.num_tokens - len(prefix) * self.block_manager.block_size, budget, self.max_prefill_chunk)
            if not self.block_manager.allocate(seq, num_new, prefix):
                break
            self.waiting.pop(0)
            self.num_admitted += 1
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_computed_tokens
            seq.status = Status.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            bisect.insort(self.running, seq, key=Sequence.sort_key)
            budget -= num_new
            out.prefills.append(ScheduledSeq(seq, num_new))
        for seq in skipped:
            bisect.insort(self.waiting, seq, key=Sequence.sort_key)
        return out

    def _lora_full(self, seq: Sequence) -> bool:
        """Would admitting `seq` put more than `max_loras` distinct adapters among the running sequences?"""
        lora = seq.params.lora
        if lora is None or self.max_loras is None:
            return False
        held = {s.params.lora.id for s in self.running if s.params.lora is not None}
        return lora.id not in held and len(held) >= self.max_loras

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) `seq` wherever it is, returning its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
