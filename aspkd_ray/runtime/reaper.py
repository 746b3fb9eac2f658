"""Free the placement groups of Ray Train runs whose controller was killed.

Tune stops a trial (its scheduler, or an interrupted sweep) by killing the trial's actor, and
with it the Ray Train controller that actor started. The controller's placement group (its
workers' CPUs and GPUs) is not removed with it: Ray Train leaves that to a cleaner actor that
asks Ray's state API whether the controller is alive, and that API needs the dashboard,
which a cluster without `ray[default]` (this project's install) does not run. The cleaner
then never removes the group, and the next trial waits forever for its CPUs (measured: an
interrupted trial's 1.49-CPU group blocked the resumed sweep on a 2-CPU machine).

`PlacementGroupReaper` does the cleaner's job from the GCS tables, which need no dashboard:
a placement group of this job whose creator actor is dead, and which is not detached, holds
resources nobody can use any more, and is removed.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def orphaned_placement_groups() -> list:
    """Placement groups of this job whose creating actor is dead (not detached, not
    removed). Read from the GCS (Ray's private state accessor: no public API gives a
    group's creator without the dashboard); [] when it cannot be read."""
    import ray
    from ray._private import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    nil = ray.ActorID.nil().binary()
    try:
        table = state.state._connect_and_get_accessor().get_placement_group_table()
    except Exception as exc:  # noqa: BLE001 - another Ray version: nothing reaped, said once
        log.debug("cannot read the placement group table: %s", exc)
        return []
    orphans = []
    for blob in table:
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        # A group the driver made (Tune's, for each trial) has no creator actor, and the
        # GCS counts that "actor" as dead: only groups made by an actor that died count.
        by_actor = pg.creator_actor_id not in (b"", nil)
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                or not by_actor or not pg.creator_actor_dead
                or pg.creator_job_id.hex() != job):
            continue
        orphans.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return orphans


def reap_placement_groups() -> int:
    """Remove the orphaned placement groups; returns how many."""
    from ray.util import remove_placement_group

    count = 0
    for pg in orphaned_placement_groups():
        try:
            remove_placement_group(pg)
            count += 1
        except Exception as exc:  # noqa: BLE001 - removed meanwhile, or GCS busy: next time
            log.debug("could not remove placement group %s: %s", pg.id.hex(), exc)
    if count:
        log.info("freed %d placement group(s) of stopped Ray Train runs", count)
    return count


class PlacementGroupReaper:
    """`with PlacementGroupReaper(): tuner.fit()`: reaps every `interval_s` in a thread."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aspkd-pg-reaper",
                                        daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            reap_placement_groups()

    def __enter__(self) -> PlacementGroupReaper:
        reap_placement_groups()  # an earlier, interrupted sweep of this driver
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
