"""The cluster balancer's own policy (`--policy cluster`): when a host cannot meet its VMs'
targets (what each host's Dynamic Memory balancer wants them to have exceeds its memory) and
another host has room, live-migrate VMs away, choosing by cost against relief.

- A host is short when its VMs' targets exceed its memory by more than `short_above` of it
  (hysteresis: a host just at its limit does not start moves); moves go on until its deficit is
  gone or the limits stop them.
- The relief of moving VM v off short host h is min(target(v), deficit(h)): memory beyond the
  deficit relieves nothing. Its cost is the memory pre-copy sends: assigned / (1 - dirty/bw)
  (a guest dirtying as fast as the link sends never converges: not a candidate). The VM with the
  most relief per byte moved goes first: a small VM that covers the deficit beats a large one.
- Its destination is the host with the most room (memory less its VMs' targets, less the
  `headroom`) that holds the VM's target, and that is not at its in-flight limit.
- Limits (pyhv.cluster.policy.Limits): migrations in flight per host and in the cluster, a
  minimum interval between two moves of one VM.

Most short hosts first. numpy columns throughout: 100 hosts and 10 000 VMs decide in
milliseconds (bench/cluster.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyhv.cluster.policy import ClusterSnapshot, Limits, Move, Plan

#: A guest must dirty memory slower than this share of the link for pre-copy to converge.
CONVERGES_BELOW = 0.8


@dataclass
class CostRelief:
    limits: Limits
    name: str = "cluster"

    def plan(self, s: ClusterSnapshot) -> Plan:
        lim = self.limits
        n_hosts = len(s.hosts)
        if n_hosts < 2 or not len(s.vm_ids):
            return Plan()
        capacity = s.capacity.astype(np.float64)
        targets = s.host_targets().astype(np.float64)
        deficit = targets - capacity
        room = capacity * (1.0 - lim.headroom) - targets
        busy = np.zeros(n_hosts, dtype=np.int64)
        if s.moving.size:
            np.add.at(busy, s.vm_host[s.moving], 1)
            np.add.at(busy, s.moving_to, 1)
        slots = lim.in_flight_cluster - int(s.moving.size)
        short = np.flatnonzero(deficit > lim.short_above * capacity)
        if not short.size:
            return Plan()
        if slots <= 0:
            return Plan(notes=(f"{short.size} hosts short; {s.moving.size} migrations in flight",))

        # Candidates: not moving, not moved within the interval, converging.
        bw = lim.bandwidth_bytes_per_s
        ratio = s.dirty_bytes_per_s / bw
        ok = (s.now - s.last_moved >= lim.min_interval_s) & (ratio < CONVERGES_BELOW)
        if s.moving.size:
            ok[s.moving] = False
        cost = s.assigned / np.maximum(1.0 - ratio, 1e-9)
        # Group the candidates by host once (sorting by host), not per short host.
        cand = np.flatnonzero(ok & np.isin(s.vm_host, short))
        order = np.argsort(s.vm_host[cand], kind="stable")
        cand = cand[order]
        starts = np.searchsorted(s.vm_host[cand], short)
        ends = np.searchsorted(s.vm_host[cand], short, side="right")
        by_host = {int(h): cand[a:b] for h, a, b in zip(short, starts, ends, strict=True)}

        moves: list[Move] = []
        notes: list[str] = []
        for h in short[np.argsort(-(deficit[short] / capacity[short]), kind="stable")].tolist():
            vms = by_host[h]
            while deficit[h] > 0 and slots > 0 and busy[h] < lim.in_flight_per_host:
                if not vms.size:
                    notes.append(
                        f"{s.hosts[h]} short by {deficit[h] / 2**20:.0f} MiB: no VM may move"
                    )
                    break
                relief = np.minimum(s.target[vms], deficit[h])
                score = relief / np.maximum(cost[vms], 1.0)
                # Destinations that hold the VM's target: the most room first.
                free_slots = busy < lim.in_flight_per_host
                free_slots[h] = False
                best_room = np.where(free_slots, room, -np.inf).max()
                fits = s.target[vms] <= best_room
                if not fits.any():
                    notes.append(
                        f"{s.hosts[h]} short by {deficit[h] / 2**20:.0f} MiB: no host has room "
                        "for any of its VMs"
                    )
                    break
                pick = int(np.argmax(np.where(fits, score, -np.inf)))
                v = int(vms[pick])
                t = float(s.target[v])
                dest_ok = free_slots & (room >= t)
                d = int(np.argmax(np.where(dest_ok, room, -np.inf)))
                moves.append(
                    Move(s.vm_ids[v], s.hosts[h], s.hosts[d], int(cost[v]), int(min(t, deficit[h])))
                )
                deficit[h] -= t
                room[h] += t
                room[d] -= t
                deficit[d] += t
                busy[h] += 1
                busy[d] += 1
                slots -= 1
                vms = np.delete(vms, pick)
        return Plan(tuple(moves), tuple(notes))
