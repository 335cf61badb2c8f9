"""Every test keeps DDS on loopback and in a domain of its own run; each test module starts with the heap that
earlier modules left frozen out of the cyclic collector."""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterator

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 100)))


@pytest.fixture(scope="module", autouse=True)
def frozen_heap() -> Iterator[None]:
    """One pytest process runs every module; by the ROS modules its heap holds the models and datasets of the
    training tests, and a full pass of the cyclic collector over it holds the GIL (up to 0.14 s in a partial run;
    a fresh-clone CI run saw 0.3 s stalls), which stalls the 20 Hz feeder threads and in-process nodes that the
    timing tests watch. A robot process does not carry that
    heap (the node freezes its own at configure), so each module freezes what the modules before it left."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
