"""The trainer's side of the node servers (:mod:`bikd.ray.node_server`): rows of other nodes, in windows of steps.

A window is ``DistConfig.exchange_every`` consecutive steps of one trainer. When it opens, its steps are
planned and each other node the window touches gets ONE pull for the union of the window's rows there (its
partitions' entity rows, and the relation rows when the relation shard is on that node); each step reads its
rows from that answer. The steps' gradients of those rows are summed, and when the window's last step is
applied they go back in one push per node, which in async mode waits for the next pull to that node and goes
with it (``NodeServer.exchange``: one call for both), or alone if the next window does not touch the node.
With windows of several steps the trainer opens the next window when one starts, so that its larger pull has
a whole window's compute to arrive in (timed: with the window opened one step ahead, the trainer waited
5.6 ms a window for it).

With ``exchange_every=1`` (the default, and sync mode) every step is its own window: one call per other node
per step. Larger windows cut the calls per step by that factor and make the rows up to ~3 windows staler
(this trainer's updates reach the other node with the window's push, and its own copy with a later window's
pull; PyTorch-BigGraph's trainers likewise work on a bucket's rows for a whole bucket). bench/kge_exchange_quality.py
measures what that costs in quality. Plain Python and torch in the trainer's process: the Ray calls
are the thin part. ``seconds`` counts the trainer thread's time in ``open``, ``read``, ``add`` and ``flush``
(waits for answers included): what the exchange costs a step, which bench/kge_scaling.py fits its model to.

(A worker thread for the exchange was tried: its Ray calls hold the GIL, so the trainer thread, which takes
the GIL back after every torch op, waited as long as the work took; with 1-thread trainers on 2 cores the
step time did not change, and the exchange's CPU time grew by a third.)
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import ray
import torch

from bikd.ray.messages import NodePull, NodePush, array, num_pieces, pieces, unpiece


@dataclass
class _Pull:
    """One node's part of a window: the union of its rows, in the order the pull asked for them."""

    msg: NodePull
    refs: list  # the answer's pieces
    entity: torch.Tensor | None = None  # (U, d_e) once fetched
    relation: torch.Tensor | None = None  # (R, d_r) once fetched, when the relation shard is there
    entity_grad: torch.Tensor | None = None  # (U, d_e) the window's summed gradients
    relation_grad: torch.Tensor | None = None


@dataclass
class _Window:
    pulls: dict[str, _Pull]
    steps_left: int  # steps not applied yet


@dataclass
class Ticket:
    """One step's rows in its window: per node (positions in the step (n,), positions in the node's union (n,)),
    and the relation rows' positions in the union of the relation node's pull (all the step's relation ids)."""

    window: _Window
    entity: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    relation: torch.Tensor | None = None


def _timed(method):
    """The method, adding its wall time to ``self.seconds``."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
    return timed


class NodeExchange:
    """Windows, their pulls and pushes, and the pushes waiting to ride on the next pull (see the module)."""

    def __init__(self, *, part: int, owner: torch.Tensor, entity_width: int):
        self.part, self.owner, self.entity_width = part, owner, entity_width
        self.connect({}, {}, None, None)
        self.num_calls = self.num_rows = 0  # calls made and rows pulled, for the trainer's counters
        self.seconds = 0.0  # the trainer thread's time in the methods below

    def connect(self, servers: dict, served: dict[int, str], relation_node: str | None, relation_width: int | None) -> None:
        """The node servers (node id -> actor), the partitions they serve (partition -> node), the relation
        shard's node if one of them serves it, and its rows' width; forgets waiting pushes."""
        self.servers, self.served, self.relation_node, self.relation_width = servers, served, relation_node, relation_width
        #: node -> (NodePush, gradient pieces) of the last window, to ride on the next pull to that node
        self.deferred: dict[str, tuple[NodePush, list]] = {}
        self.sent: list = []  # refs of pushes sent since ``take_sent``

    @property
    def active(self) -> bool:
        return bool(self.served) or self.relation_node is not None

    @_timed
    def open(self, steps: list[tuple[torch.Tensor, torch.Tensor, list]], version: int) -> list[Ticket]:
        """A window for ``steps``: per step (entity ids (U_e,), relation ids (U_r,), groups [(partition,
        positions in the step)]); sends one pull per node the window touches, returns each step's ticket."""
        window = _Window(pulls={}, steps_left=len(steps))
        tickets = [Ticket(window=window) for _ in steps]
        by_node: dict[str, list] = {}  # node -> [(step index, positions in the step, ids)]
        for i, (entity_ids, _, groups) in enumerate(steps):
            for s, pos in groups:
                if s in self.served:
                    by_node.setdefault(self.served[s], []).append((i, pos, entity_ids[pos]))
        if self.relation_node is not None:
            by_node.setdefault(self.relation_node, [])
        for node, items in by_node.items():
            ids = torch.cat([ids for *_, ids in items]) if items else torch.empty(0, dtype=torch.long)
            union, where = _grouped_union(ids, self.owner)
            parts, sizes = torch.unique_consecutive(self.owner[union], return_counts=True)
            for (i, pos, _), step_where in zip(items, where.split([len(ids) for *_, ids in items])):
                tickets[i].entity[node] = (pos, step_where)
            relation_ids = None
            if node == self.relation_node:
                relation_ids, inverse = torch.unique(torch.cat([rel for _, rel, _ in steps]), return_inverse=True)
                for ticket, step_inverse in zip(tickets, inverse.split([len(rel) for _, rel, _ in steps])):
                    ticket.relation = step_inverse
            floats = len(union) * self.entity_width + (0 if relation_ids is None else len(relation_ids) * self.relation_width)
            msg = NodePull(version=version, parts=tuple(parts.tolist()), sizes=tuple(sizes.tolist()), ids=array(union),
                           relation_ids=None if relation_ids is None else array(relation_ids), num_pieces=num_pieces(floats))
            window.pulls[node] = _Pull(msg=msg, refs=self._pull(node, msg))
            self.num_rows += len(union) + (0 if relation_ids is None else len(relation_ids))
        self.num_calls += len(window.pulls)
        self._flush()  # pushes to nodes this window does not touch go alone
        return tickets

    def _pull(self, node: str, msg: NodePull) -> list:
        server, waiting = self.servers[node], self.deferred.pop(node, None)
        if waiting is None:
            refs = server.pull.options(num_returns=msg.num_pieces).remote(msg)
            return refs if msg.num_pieces > 1 else [refs]
        # the last window's push to this node rides on this pull: one call, not two
        ack, *refs = server.exchange.options(num_returns=1 + msg.num_pieces).remote(waiting[0], msg, *waiting[1])
        self.sent.append(ack)
        return refs

    @_timed
    def read(self, ticket: Ticket, entity_rows: torch.Tensor) -> torch.Tensor | None:
        """Write the step's rows from other nodes into ``entity_rows`` (U_e, d_e); the relation rows (U_r, d_r)
        when they come from a node server, else None. Waits for the window's answers the first time."""
        relation = None
        for node, pull in ticket.window.pulls.items():
            if pull.entity is None:
                shapes = [(len(pull.msg.ids), self.entity_width)]
                if pull.msg.relation_ids is not None:
                    shapes.append((len(pull.msg.relation_ids), self.relation_width))
                pull.entity, *rel = unpiece(ray.get(pull.refs), *shapes)
                pull.relation = rel[0] if rel else None
                pull.refs = []
            if node in ticket.entity:
                pos, where = ticket.entity[node]
                entity_rows[pos] = pull.entity[where]
            if pull.relation is not None:
                relation = pull.relation[ticket.relation]
        return relation

    @_timed
    def add(self, ticket: Ticket, entity_grad: torch.Tensor, relation_grad: torch.Tensor, *, defer: bool, step: int) -> list:
        """Add a step's gradients (U_e, d_e) and (U_r, d_r) to its window's sums; after the window's last step,
        push them: wait for the next pull (``defer``) or send now. Returns the refs of pushes sent."""
        window = ticket.window
        for node, pull in window.pulls.items():
            if pull.entity_grad is None:
                pull.entity_grad = torch.zeros(len(pull.msg.ids), self.entity_width)
                if pull.msg.relation_ids is not None:
                    pull.relation_grad = torch.zeros(len(pull.msg.relation_ids), self.relation_width)
            if node in ticket.entity:
                pos, where = ticket.entity[node]
                pull.entity_grad.index_add_(0, where, entity_grad[pos])
            if pull.relation_grad is not None:
                pull.relation_grad.index_add_(0, ticket.relation, relation_grad)
        window.steps_left -= 1
        if window.steps_left:
            return []
        pushes = {node: (NodePush(step=step, source=self.part, parts=p.msg.parts, sizes=p.msg.sizes, ids=p.msg.ids,
                                  relation_ids=p.msg.relation_ids),
                         pieces(array(p.entity_grad), None if p.relation_grad is None else array(p.relation_grad)))
                  for node, p in window.pulls.items()}
        window.pulls = {}
        if defer:
            self._flush()  # pushes of an earlier window no pull took (the epoch's last windows open none)
            self.deferred = pushes
            return []
        return self._send(pushes)

    @_timed
    def flush(self) -> None:
        """Send the pushes still waiting for a pull, each alone."""
        self._flush()

    def _flush(self) -> None:  # (untimed: open and add call it inside their own time)
        self.sent += self._send(self.deferred)
        self.deferred = {}

    def _send(self, pushes: dict[str, tuple[NodePush, list]]) -> list:
        """Each push in a call of its own; their refs."""
        self.num_calls += len(pushes)
        return [self.servers[node].push.remote(msg, *grads) for node, (msg, grads) in pushes.items()]

    def take_sent(self) -> list:
        sent, self.sent = self.sent, []
        return sent

    def reset(self) -> None:
        """Forget waiting pushes (a restore replaces what they would have updated)."""
        self.deferred, self.sent = {}, []


def _grouped_union(ids: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the unique ids grouped by owning partition (U,), each input id's position in it (n,))."""
    union, inverse = torch.unique(ids, return_inverse=True)
    order = torch.argsort(owner[union], stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return union[order], rank[inverse]
