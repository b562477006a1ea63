"""Property test of the reliable queue: random operation sequences against a real Redis.

Three simulated instances (``Queue`` objects with their own instance ids and in-memory
held sets) share one Redis and one fake clock. Operations: enqueue (and re-enqueue of
an existing id), claim, ack, fail (retry now / later / dead), release, renew, advance
the clock (with or without the instances' heartbeats), reap, hang one instance past its
lease, crash and restart an instance (same or new id), dead-letter retry and delete, and
``recover``.

After every step the test reads the whole shard back (one MULTI/EXEC) and checks that
every job id is in exactly one place and that its state agrees with it (queued: ready;
processing: its owner's list, with a lease;
retrying: delayed; failed: dead; cancelled: at most a stale copy in a ready list),
that the backlog counter equals the ready lists' length, that every tenant with ready
jobs is on its lane's ring exactly once, that nothing is lost, duplicated or left over
after a delete, that leases exist only for ids in a processing list, and that acked jobs stay
``sent`` and are never claimed again. ``recover`` advances the clock past every lease
with the live instances heartbeating, reaps, and checks that nothing held only by a
crashed instance (or by nobody) is left in a processing list.

A "stale holder" -- a live instance that stalled past ``lease_s`` while its job was
requeued, maybe claimed elsewhere -- may ack (designed to be safe: the record says
``sent``; a copy left in a list is skipped by claim, promotion and reap) and renew.
It may also fail or release such a job (the scripts act only on jobs still in the
caller's list). Those were bugs this test found; the minimal sequences at the bottom pin
them (``stale_bugs=False`` would keep those paths out of the random test).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.config import QueueSettings
from engine.embedded import RedisServer
from engine.models import LANES
from engine.queue import EnqueueRequest, Failure, NewJob, Queue, Redis, open_redis

SETTINGS = QueueSettings(lease_s=2.0, heartbeat_s=1.0, max_stalls=1)
N_INSTANCES = 3
START = 1_000_000.0

# -- operations ------------------------------------------------------------------------
# Plain tuples so Hypothesis prints and shrinks them well. The first number of an
# instance operation picks (modulo) among the instances it can apply to (live ones; for
# ack/fail/release those holding a job; for restart crashed ones; for reap any), then
# ``pick`` indexes a sorted candidate list. An operation with nothing to act on is a no-op.

_inst = st.integers(0, N_INSTANCES - 1)
_pick = st.integers(0, 63)
_STRATEGIES: dict[str, st.SearchStrategy[tuple[object, ...]]] = {
    "enqueue": st.tuples(st.just("enqueue"), st.integers(1, 4)),
    "claim": st.tuples(st.just("claim"), _inst, st.integers(1, 4)),
    "ack": st.tuples(st.just("ack"), _inst, _pick),
    "fail": st.tuples(
        st.just("fail"), _inst, _pick, st.sampled_from(["retry_now", "retry_later", "dead"])
    ),
    "release": st.tuples(st.just("release"), _inst, _pick, st.booleans()),  # True: all
    "renew": st.tuples(st.just("renew"), _inst),
    "advance": st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.5]), st.booleans()),
    "reap": st.tuples(st.just("reap"), _inst),
    "hang": st.tuples(st.just("hang"), _inst),
    "crash": st.tuples(st.just("crash"), _inst),
    "restart": st.tuples(st.just("restart"), _inst, st.booleans()),  # True: same id
    "enqueue_again": st.tuples(st.just("enqueue_again"), _pick),
    "dead_retry": st.tuples(st.just("dead_retry"), _pick),
    "dead_delete": st.tuples(st.just("dead_delete"), _pick),
    "cancel": st.tuples(st.just("cancel"), _pick),
    "recover": st.just(("recover",)),
}
# Relative frequencies: the common operations come up more often.
_WEIGHTS = {
    "enqueue": 2, "claim": 4, "ack": 4, "fail": 3, "release": 1, "renew": 1, "advance": 2,
    "reap": 2, "hang": 2, "crash": 1, "restart": 1, "enqueue_again": 1,
    "dead_retry": 1, "dead_delete": 1, "cancel": 1, "recover": 1,
}  # fmt: skip
OPERATION = st.sampled_from([n for n, w in _WEIGHTS.items() for _ in range(w)]).flatmap(
    _STRATEGIES.__getitem__
)

INSTANCE_OPS = frozenset(
    ("claim", "ack", "fail", "release", "renew", "reap", "crash", "restart", "hang")
)


@dataclass
class Instance:
    """One simulated engine process: its Queue and in-memory set of claimed jobs."""

    slot: int
    iid: str
    queue: Queue
    held: set[str] = field(default_factory=set)
    alive: bool = True


@dataclass
class Snapshot:
    ready: list[str]  # all lanes and tenants
    rings: dict[str, list[str]]  # lane -> tenants
    nonempty: set[tuple[str, str]]  # (lane, tenant) of non-empty ready lists
    lane_sizes: dict[tuple[str, str], int]  # (lane, tenant) -> ready list length
    processing: dict[str, list[str]]  # instance id -> list
    delayed: dict[str, float]
    dead: list[str]
    leases: dict[str, float]
    instances: dict[str, float]
    jobs: dict[str, dict[str, object]]  # id -> state/owner/msg/stalls
    job_keys: set[str]
    stats: dict[str, int]


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class Model:
    """Runs operations against Redis and checks the invariants after each one."""

    def __init__(self, client: Redis, *, stale_bugs: bool = False) -> None:
        self.client = client
        # True lets stale holders fail and release.
        self.stale_bugs = stale_bugs
        self.now = [START]
        self.instances = [self._start(slot, f"i{slot}") for slot in range(N_INSTANCES)]
        self.incarnations = [0] * N_INSTANCES
        self.keys = self.instances[0].queue.keys
        self.enqueued: dict[str, bytes] = {}  # id -> payload, of records that exist
        self.deleted: set[str] = set()  # dead-lettered, then deleted by dead_delete
        self.acked: set[str] = set()  # existing records that must say 'sent'
        self.sent_total = 0
        self.failed_dead: set[str] = set()
        self.cancelled: set[str] = set()
        # ids held in memory by crashed incarnations, per instance id
        self.ghosts: dict[str, set[str]] = {}
        self.next_id = 0

    def _start(self, slot: int, iid: str) -> Instance:
        q = Queue(self.client, SETTINGS, iid, clock=lambda: self.now[0])
        return Instance(slot, iid, q)

    async def start(self) -> None:
        for inst in self.instances:
            await inst.queue.renew([])  # the reaper heartbeats before senders claim

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.alive]

    def live_or_any(self) -> Instance:
        return next(iter(self.live()), self.instances[0])

    # -- reading Redis -----------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Everything of the shard, read in one MULTI/EXEC (a consistent picture)."""
        c, k = self.client, self.keys
        pkeys = sorted(_s(x) for x in await c.keys(k.prefix + "processing:*"))
        rkeys = sorted(_s(x) for x in await c.keys(k.prefix + "ready:*"))
        ids = sorted(self.enqueued)
        fields = ["state", "owner", "msg", "stalls"]
        async with c.pipeline(transaction=True) as p:
            rings = [p.lrange(k.ring(lane), 0, -1) for lane in LANES]
            plists = [p.lrange(key, 0, -1) for key in pkeys]
            rlists = [p.lrange(key, 0, -1) for key in rkeys]
            recs = [p.hmget(k.job(job_id), fields) for job_id in ids]
            delayed = p.zrange(k.delayed, 0, -1, withscores=True)
            dead = p.lrange(k.dead, 0, -1)
            leases = p.zrange(k.leases, 0, -1, withscores=True)
            instances = p.zrange(k.instances, 0, -1, withscores=True)
            job_keys = p.keys(k.job_prefix + "*")
            stats = p.hgetall(k.stats)
        ready_lists = {
            key: [_s(x) for x in await fut] for key, fut in zip(rkeys, rlists, strict=True)
        }
        nonempty = set()
        lane_sizes: dict[tuple[str, str], int] = {}
        for key, lst in ready_lists.items():
            _, lane, tenant = key.removeprefix(k.prefix).split(":")
            lane_sizes[(lane, tenant)] = len(lst)
            if lst:
                nonempty.add((lane, tenant))
        jobs: dict[str, dict[str, object]] = {}
        for job_id, fut in zip(ids, recs, strict=True):
            state, owner, msg, stalls = await fut
            rec: dict[str, object] = {"stalls": int(stalls or 0)}
            if state is not None:
                rec["state"] = _s(state)
            if owner is not None:
                rec["owner"] = _s(owner)
            if msg is not None:
                rec["msg"] = msg
            jobs[job_id] = rec
        return Snapshot(
            ready=[job_id for lst in ready_lists.values() for job_id in lst],
            rings={
                lane: [_s(x) for x in await fut] for lane, fut in zip(LANES, rings, strict=True)
            },
            nonempty=nonempty,
            lane_sizes=lane_sizes,
            processing={
                key.removeprefix(k.prefix + "processing:"): [_s(x) for x in await fut]
                for key, fut in zip(pkeys, plists, strict=True)
            },
            delayed={_s(m): s for m, s in await delayed},
            dead=[_s(x) for x in await dead],
            leases={_s(m): s for m, s in await leases},
            instances={_s(m): s for m, s in await instances},
            jobs=jobs,
            job_keys={_s(x).removeprefix(k.job_prefix) for x in await job_keys},
            stats={_s(f): int(v) for f, v in (await stats).items()},
        )

    async def owned(self, inst: Instance) -> list[str]:
        """Held ids this instance still owns in Redis (processing, owner, in its list)."""
        snap = await self.snapshot()
        mine = snap.processing.get(inst.iid, [])
        return sorted(
            j
            for j in inst.held
            if j in snap.jobs  # a stale holder may hold a job since deleted
            and snap.jobs[j].get("state") == "processing"
            and snap.jobs[j].get("owner") == inst.iid
            and j in mine
        )

    # -- invariants --------------------------------------------------------------------

    async def check(self) -> Snapshot:
        snap = await self.snapshot()
        ids = set(self.enqueued)
        # No phantom jobs, no lost records, deleted ones gone from everywhere.
        assert snap.job_keys == ids, "job records differ from the enqueued ids"
        everywhere = [*snap.ready, *snap.delayed, *snap.dead]
        for lst in snap.processing.values():
            everywhere += lst
        assert set(everywhere) <= ids, "an unknown or deleted id is queued somewhere"
        assert set(snap.leases) <= {j for lst in snap.processing.values() for j in lst}, (
            "a lease exists for an id in no processing list"
        )
        ready = Counter(snap.ready)
        dead = Counter(snap.dead)
        where = {iid: Counter(lst) for iid, lst in snap.processing.items()}
        for job_id in sorted(ids):
            rec = snap.jobs[job_id]
            state, owner = rec.get("state"), rec.get("owner")
            assert rec.get("msg") == self.enqueued[job_id], f"{job_id}: payload changed"
            r, d, dl = ready[job_id], int(job_id in snap.delayed), dead[job_id]
            p = {iid: c[job_id] for iid, c in where.items() if c[job_id]}
            np = sum(p.values())
            leased = job_id in snap.leases
            ctx = f"{job_id} state={state} owner={owner} ready={r} processing={p} "
            ctx += f"delayed={d} dead={dl} lease={leased}"
            if state == "queued":
                assert r == 1 and np == 0 and d == 0 and dl == 0, ctx
                assert not leased and owner is None, ctx
            elif state == "processing":
                assert r == 0 and d == 0 and dl == 0 and np == 1, ctx
                assert owner is not None and p == {owner: 1}, ctx
                assert leased, ctx
                inst = next((i for i in self.instances if i.alive and i.iid == owner), None)
                ghosts = self.ghosts.get(str(owner), set())
                assert (inst is not None and job_id in inst.held) or job_id in ghosts, (
                    f"{ctx}: owned by an instance that never held it"
                )
            elif state == "retrying":
                assert d == 1 and r == 0 and np == 0 and dl == 0, ctx
                assert not leased and owner is None, ctx
            elif state == "failed":
                assert dl == 1 and r == 0 and np == 0 and d == 0, ctx
                assert not leased and owner is None, ctx
                stalled = int(rec["stalls"]) > SETTINGS.max_stalls  # type: ignore[call-overload]
                assert job_id in self.failed_dead or stalled, ctx
            elif state == "cancelled":
                # Its id may linger in a ready list (claim drops it).
                assert job_id in self.cancelled and r <= 1 and np == 0 and d == 0 and dl == 0, ctx
            elif state == "sent":
                # Acked by a holder whose lease had lapsed: a stale copy may linger
                # (claim, promotion and reap skip it), but at most one.
                assert job_id in self.acked, ctx
                assert r + np + d + dl <= 1, ctx
            else:
                raise AssertionError(f"{ctx}: unexpected state")
        sent = {j for j, rec in snap.jobs.items() if rec.get("state") == "sent"}
        assert sent == self.acked, "acked ids and 'sent' records differ"
        assert snap.stats.get("enqueued", 0) == len(ids) + len(self.deleted)
        assert snap.stats.get("sent", 0) == self.sent_total
        assert snap.stats.get("backlog", 0) == len(snap.ready), "backlog counter drifted"
        for lane in LANES:
            in_lane = sum(n for (lane_, _), n in snap.lane_sizes.items() if lane_ == lane)
            assert snap.stats.get(f"ready:{lane}", 0) == in_lane, f"{lane} counter drifted"
        for lane, ring in snap.rings.items():
            assert len(set(ring)) == len(ring), f"a tenant is twice on the {lane} ring"
            for lane_, tenant in snap.nonempty:
                if lane_ == lane:
                    assert tenant in ring, f"{tenant} has {lane} jobs but is off the ring"
        return snap

    async def check_recovered(self) -> None:
        """After every lease and heartbeat of the dead has expired and a reap ran."""
        snap = await self.check()
        held = set().union(*(i.held for i in self.live()))
        live_ids = {i.iid for i in self.live()}
        for iid, lst in snap.processing.items():
            for job_id in lst:
                assert job_id in held, (
                    f"{job_id} still in processing:{iid} after recovery, held by no live "
                    f"instance (state={snap.jobs[job_id].get('state')})"
                )
        for iid in snap.instances:
            assert iid in live_ids, f"crashed instance {iid} still registered"
        for iid in snap.processing:
            assert iid in live_ids, f"crashed instance {iid} still has a processing list"
        assert all(score > self.now[0] * 1000 for score in snap.delayed.values()), (
            "a due delayed job was not promoted"
        )

    # -- operations --------------------------------------------------------------------

    async def heartbeat(self, hung: Instance | None = None) -> None:
        for inst in self.live():
            if inst is not hung:
                await inst.queue.renew(sorted(inst.held))

    async def advance(self, seconds: float, heartbeat: bool, hung: Instance | None = None) -> None:
        """Move the clock; with ``heartbeat`` every live instance (but ``hung``) renews
        each heartbeat_s on the way, as its timer would."""
        while seconds > 0:
            step = min(seconds, SETTINGS.heartbeat_s) if heartbeat else seconds
            self.now[0] += step
            seconds -= step
            if heartbeat:
                await self.heartbeat(hung)

    async def apply(self, op: tuple[object, ...]) -> str:
        """Run one operation; returns what it did ("" for a no-op), for statistics."""
        name = str(op[0])
        if name not in INSTANCE_OPS:
            return await self._apply_global(name, op)
        inst = await self._choose(name, int(op[1]))  # type: ignore[call-overload]
        if inst is None:
            return ""
        q = inst.queue
        if name == "claim":
            jobs = await q.claim(int(op[2]))  # type: ignore[call-overload]
            for job in jobs:
                assert job.id not in self.acked, f"acked job {job.id} claimed again"
                assert job.id in self.enqueued, f"deleted job {job.id} claimed"
                assert job.payload == self.enqueued[job.id], f"{job.id}: wrong payload"
                assert job.attempt >= 1
                inst.held.add(job.id)
            return name if jobs else ""
        if name == "ack":
            if not inst.held:
                return ""
            job_id = sorted(inst.held)[int(op[2]) % len(inst.held)]  # type: ignore[call-overload]
            stale = job_id not in await self.owned(inst)
            await q._flush_ack([(job_id, "", "", "")])
            if not stale:  # the owner's ack leaves no copy anywhere
                snap = await self.snapshot()
                lists = [snap.ready, snap.dead, list(snap.delayed), *snap.processing.values()]
                assert all(job_id not in lst for lst in lists), f"{job_id} left over after ack"
            inst.held.discard(job_id)
            if job_id in self.enqueued and job_id not in self.acked:
                self.acked.add(job_id)
                self.sent_total += 1
            return "ack (stale holder)" if stale else name
        if name in ("fail", "release"):
            cands = sorted(inst.held) if self.stale_bugs else await self.owned(inst)
            if not cands:
                return ""
            pick = int(op[2])  # type: ignore[call-overload]
            if name == "release":
                ids = cands if op[3] else [cands[pick % len(cands)]]
                await q.release(ids)
                inst.held.difference_update(ids)
                return name
            job_id = cands[pick % len(cands)]
            outcome, now_ms = str(op[3]), q.now_ms()
            due = now_ms if outcome == "retry_now" else now_ms + 3000
            kind = "dead" if outcome == "dead" else "retry"
            await q.fail([Failure(job_id, kind, due, "4xx/5xx")])
            inst.held.discard(job_id)
            if kind == "dead":
                self.failed_dead.add(job_id)
            return f"fail {kind}"
        if name == "renew":
            await q.renew(sorted(inst.held))
            return name
        if name == "reap":
            r = await q.reap()
            return name if r.promoted or r.requeued or r.instances_removed else ""
        if name == "crash":
            inst.alive = False
            self.ghosts.setdefault(inst.iid, set()).update(inst.held)
            inst.held = set()
            return name
        if name == "restart":
            slot = inst.slot
            self.incarnations[slot] += 1
            same = bool(op[2])
            iid = inst.iid if same else f"i{slot}r{self.incarnations[slot]}"
            self.instances[slot] = new = self._start(slot, iid)
            await new.queue.renew([])
            return "restart same id" if same else "restart new id"
        if name == "hang":  # GC pause / lost Redis link: misses its renewals, others reap
            await self.advance(SETTINGS.lease_s + 0.5, heartbeat=True, hung=inst)
            r = await self.live_or_any().queue.reap()
            return name if r.requeued or r.instances_removed else ""
        raise AssertionError(op)

    async def _choose(self, name: str, pick: int) -> Instance | None:
        """The ``pick``-th instance (modulo) of those the operation can apply to."""
        if name == "reap":
            pool = self.instances  # the reaper code of any instance, even a crashed one's
        elif name == "restart":
            pool = [i for i in self.instances if not i.alive]
        elif name == "ack":
            pool = [i for i in self.live() if i.held]
        elif name in ("fail", "release"):
            pool = [i for i in self.live() if i.held and (self.stale_bugs or await self.owned(i))]
        else:  # a crashed process does nothing
            pool = self.live()
        return pool[pick % len(pool)] if pool else None

    async def _apply_global(self, name: str, op: tuple[object, ...]) -> str:
        q = self.live_or_any().queue
        if name == "enqueue":
            jobs = []
            for _ in range(int(op[1])):  # type: ignore[call-overload]
                n = self.next_id
                job_id = f"j{n:03d}"
                self.next_id += 1
                # Mostly the default lane and tenant.
                lane = LANES[n % 5] if n % 5 < 3 else "normal"
                tenant = "default" if n % 4 else "t2"
                jobs.append(NewJob(job_id, f"payload-{job_id}".encode(), lane, tenant))
            await q._flush_enqueue([EnqueueRequest(jobs)])
            self.enqueued.update((j.id, j.payload) for j in jobs)
            return name
        if name == "enqueue_again":  # a client retry after a lost reply: no effect
            if not self.enqueued:
                return ""
            job_id = sorted(self.enqueued)[int(op[1]) % len(self.enqueued)]  # type: ignore[call-overload]
            await q._flush_enqueue([EnqueueRequest([NewJob(job_id, b"other")])])
            return name
        if name == "cancel":
            if not self.enqueued:
                return ""
            job_id = sorted(self.enqueued)[int(op[1]) % len(self.enqueued)]  # type: ignore[call-overload]
            outcome, state = await q.cancel(job_id)
            if outcome == "cancelled":
                self.cancelled.add(job_id)
                return f"cancel {state}"
            return "cancel refused"
        if name in ("dead_retry", "dead_delete"):
            dead = sorted(set(await q.dead_ids()))
            if not dead:
                return ""
            job_id = dead[int(op[1]) % len(dead)]  # type: ignore[call-overload]
            if name == "dead_retry":
                await q.dead_retry([job_id])
            else:
                assert await q.dead_delete([job_id]) == [job_id]
                del self.enqueued[job_id]
                self.deleted.add(job_id)
                self.acked.discard(job_id)
            return name
        if name == "advance":
            heartbeat = bool(op[2])
            await self.advance(float(op[1]), heartbeat)  # type: ignore[arg-type]
            return "advance" if heartbeat else "advance (stall)"
        if name == "recover":
            await self.advance(SETTINGS.lease_s + SETTINGS.heartbeat_s + 0.5, heartbeat=True)
            await q.reap()
            await self.check_recovered()
            return name
        raise AssertionError(op)


async def run_operations(
    url: str, ops: list[tuple[object, ...]], *, stale_bugs: bool = False
) -> list[str]:
    """Run ``ops`` on a flushed Redis, checking after each; returns what each did."""
    failure: AssertionError | None = None
    done: list[str] = []
    async with open_redis(url) as client:
        await client.flushall()
        model = Model(client, stale_bugs=stale_bugs)
        await model.start()
        await model.apply(("enqueue", 4))  # something to work on from the first step
        trace: list[str] = ["start: ('enqueue', 4)"]
        try:
            await model.check()
            for step, op in enumerate(ops):
                trace.append(f"step {step}: {op}  t={model.now[0] - START:.1f}s")
                done.append(await model.apply(op))
                await model.check()
        except AssertionError as exc:
            exc.add_note("\n".join(trace))
            failure = exc  # raised outside the client's task group: not wrapped in a group
    if failure is not None:
        raise failure
    return done


def run(url: str, ops: list[tuple[object, ...]], *, stale_bugs: bool = False) -> list[str]:
    # A sync test driving trio.run itself: a failed check surfaces as a bare
    # AssertionError (no nursery ExceptionGroup), so Hypothesis'
    # failure de-duplication see the real error.
    return trio.run(functools.partial(run_operations, url, ops, stale_bugs=stale_bugs))


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(OPERATION, min_size=10, max_size=30))
def test_random_operations_keep_every_job_in_exactly_one_place(
    redis_server: RedisServer, ops: list[tuple[object, ...]]
) -> None:
    for what in sorted(set(run(redis_server.url, ops, stale_bugs=True)) - {""}):
        event(what)  # --hypothesis-show-statistics: how often each path was exercised


# -- regressions: minimal sequences of bugs this test found (fixed in the Lua scripts) ---


def test_stale_fail_does_not_steal_a_job_claimed_elsewhere(
    redis_server: RedisServer,
) -> None:
    ops: list[tuple[object, ...]] = [
        ("claim", 0, 1),  # i0 holds j000
        ("advance", 2.5, False),  # i0 stalls past its lease
        ("reap", 1),  # j000 back to ready
        ("claim", 1, 1),  # i1 claims it
        ("fail", 0, 0, "retry_now"),  # i0 wakes up, its attempt failed: retry
    ]
    run(redis_server.url, ops, stale_bugs=True)


def test_stale_release_keeps_the_new_owners_lease(redis_server: RedisServer) -> None:
    ops: list[tuple[object, ...]] = [
        ("claim", 0, 1),
        ("advance", 2.5, False),
        ("reap", 1),
        ("claim", 1, 1),
        ("release", 0, 0, True),  # i0 shuts down and releases what it thinks it holds
    ]
    run(redis_server.url, ops, stale_bugs=True)
