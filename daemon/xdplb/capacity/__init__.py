"""Capacity-aware weights: load feedback and slow start turn configured weights
into effective ones, without letting either rewrite too much of a ring.

effective weight = configured weight x capacity factor x slow-start factor.
A backend's load comes from a Prometheus metric lbd scrapes (scrape: the
I/O) or from reports pushed to the API; a normalised multiplicative control
law moves the factors (members: the controller's state and the steps it
wants, the policy); ring positions rewritten by adaptation are capped by a
churn budget, while slow start follows the operator's schedule (controller).
docs/health-and-capacity.md explains the law, its parameters and why.
"""

from xdplb.capacity.controller import CapacityController
from xdplb.capacity.members import GAIN, MAX_STEP, SLOW_START_FLOOR, MemberLoad
from xdplb.capacity.scrape import SCRAPE_LIMIT, MalformedLoad, ScrapeError, parse_load, scrape
from xdplb.state import MemberId

__all__ = [
    "GAIN",
    "MAX_STEP",
    "SCRAPE_LIMIT",
    "SLOW_START_FLOOR",
    "CapacityController",
    "MalformedLoad",
    "MemberId",
    "MemberLoad",
    "ScrapeError",
    "parse_load",
    "scrape",
]
