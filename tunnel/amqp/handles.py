"""Typed handles on proton's C link and delivery: how the code above the engine touches AMQP.

proton's Python binding wraps every C object anew at each call and copies
bytes up to three times on the way in and out. The per-chunk paths (credit,
sending, receiving, outcomes) therefore go through cffi directly, and this
module and :mod:`tunnel.amqp.engine` are the only ones that do. Everything
else uses :class:`Link` and :class:`Delivery`, whose methods say what they
do in AMQP's words.

One :class:`Link` is made per proton link and kept in the link's record
(:func:`link_of`), so every event about a link hands its owner the same
object; it holds the owner too, so one lookup per event finds both. A
:class:`Delivery` is made per event; two for the same proton delivery
compare equal, so a delivery can key a dict across events.

The cold paths (termini, names, sessions) go through proton's own Python
objects (:attr:`Link.proton`), which are typed and copy nothing that matters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import cproton
from proton import Condition, Data, Endpoint, Session, Terminus, symbol
from proton import Delivery as _ProtonDelivery
from proton import Link as _ProtonLink

from ..census import counted

_ffi = cproton.ffi
_lib = cproton.lib

_HANDLE = "tunnel_handle"

ACCEPTED = int(_ProtonDelivery.ACCEPTED)
RECEIVED = int(_ProtonDelivery.RECEIVED)
RELEASED = int(_ProtonDelivery.RELEASED)
REJECTED = int(_ProtonDelivery.REJECTED)
MODIFIED = int(_ProtonDelivery.MODIFIED)
#: The terminal outcomes (AMQP 1.0 §3.4), and received, by name for logs.
OUTCOME_NAMES = {
    ACCEPTED: "accepted",
    RELEASED: "released",
    REJECTED: "rejected",
    MODIFIED: "modified",
    RECEIVED: "received",
}
#: The message annotation a modified outcome carries its reason in, for the sender's error.
FAILURE_ANNOTATION = "x-opt-tunnel-failure"


def outcome_name(state: int) -> str:
    return OUTCOME_NAMES.get(state, str(state))


class LinkOwner(Protocol):
    """What hears about one link: a carrier, a message sender or receiver, a router part."""

    def on_link_opened(self, link: Link) -> None: ...
    def on_link_flow(self, link: Link) -> None: ...
    def on_delivery(self, link: Link, delivery: Delivery) -> None: ...
    def on_link_closed(self, link: Link) -> None: ...


@counted("link_handles")
class Link:
    """One AMQP link (proton's ``pn_link_t``)."""

    __slots__ = ("is_sender", "owner", "raw")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        #: What hears the link's events (None: nobody); see :meth:`own`.
        self.owner: LinkOwner | None = None
        self.is_sender = bool(_lib.pn_link_is_sender(raw))

    # -- identity and termini (cold paths) -------------------------------------
    @property
    def proton(self) -> _ProtonLink:
        """proton's Python object for this link, for its termini and session."""
        link: _ProtonLink = _ProtonLink.wrap(self.raw)  # type: ignore[no-untyped-call]
        return link

    @property
    def name(self) -> str:
        return str(_ffi.string(_lib.pn_link_name(self.raw)).decode())

    @property
    def session(self) -> Session:
        return self.proton.session

    @property
    def remote_source_address(self) -> str | None:
        return _address(self.proton.remote_source)

    @property
    def remote_condition(self) -> Condition | None:
        condition: Condition | None = self.proton.remote_condition
        return condition

    def remote_capabilities(self, *, source: bool) -> set[str]:
        """The capabilities of the peer's source (or target) terminus."""
        link = self.proton
        return capabilities(link.remote_source if source else link.remote_target)

    @property
    def remote_active(self) -> bool:
        return bool(_lib.pn_link_state(self.raw) & Endpoint.REMOTE_ACTIVE)

    @property
    def closed(self) -> bool:
        """Closed by us."""
        return bool(_lib.pn_link_state(self.raw) & Endpoint.LOCAL_CLOSED)

    def open(self) -> None:
        """Attach (or answer the peer's attach), unless done already."""
        if _lib.pn_link_state(self.raw) & Endpoint.LOCAL_UNINIT:
            _lib.pn_link_open(self.raw)

    def mirror(self, *, target_capability: str | None = None, max_message_size: int = 0) -> None:
        """Answer the peer's attach with its own termini, adding ``target_capability``."""
        link = self.proton
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if target_capability is not None:
            add_capability(link.target, target_capability)
        if max_message_size:
            link.max_message_size = max_message_size

    # -- owner --------------------------------------------------------------
    def own(self, owner: LinkOwner | None) -> None:
        """Give the link's events to ``owner`` (None: nobody)."""
        self.owner = owner

    # -- credit ---------------------------------------------------------------
    @property
    def credit(self) -> int:
        return int(_lib.pn_link_credit(self.raw))

    def flow(self, credit: int) -> None:
        """Grant ``credit`` more deliveries (a receiver)."""
        _lib.pn_link_flow(self.raw, credit)

    def top_up(self, window: int) -> bool:
        """Keep ``window`` credit outstanding, topping up once half is used; True if granted."""
        credit = _lib.pn_link_credit(self.raw)
        if credit <= window // 2:
            _lib.pn_link_flow(self.raw, window - credit)
            return True
        return False

    # -- sending --------------------------------------------------------------
    def advance(self) -> None:
        """End the current delivery: its last transfer goes out with ``more=false``."""
        _lib.pn_link_advance(self.raw)

    # -- receiving ------------------------------------------------------------
    def recv(self, size: int) -> bytearray:
        """The next ``size`` bytes of the current delivery, copied once."""
        out = bytearray(size)
        got = _lib.pn_link_recv(self.raw, _ffi.from_buffer(out), size)
        if got < size:
            del out[max(got, 0) :]
        return out

    def is_current(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is the one the link reads (or sends) now."""
        return bool(_lib.pn_link_current(self.raw) == delivery.raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Link) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"<Link {self.name!r}>"


class PartialMessage:
    """A delivery still arriving, received in place: each byte is copied once, out of proton.

    Extending a buffer read by read copies what it held at every growth, and
    for a 128 KiB delivery arriving in 16 KiB frames that cost more than the
    copy out of proton. So the buffer is made, at the first read, for what
    the sender's deliveries usually hold (``expect``), and doubles when a
    delivery is larger, but never past ``limit`` unless what it holds is: its
    holder refuses a delivery :attr:`over` the limit, so the buffer stays
    within the limit plus one transfer.
    """

    __slots__ = ("_buffer", "expect", "limit", "size")

    def __init__(self, expect: int, limit: int) -> None:
        self._buffer = bytearray()
        self.expect = expect
        self.limit = limit
        #: The bytes received so far (the buffer may be larger).
        self.size = 0

    @property
    def over(self) -> bool:
        return self.size > self.limit

    def receive(self, link: Link, count: int) -> None:
        """The next ``count`` bytes of the delivery being read on ``link``."""
        end = self.size + count
        if end > len(self._buffer):
            grown = max(end, min(max(2 * len(self._buffer), self.expect), self.limit))
            self._buffer.extend(bytes(grown - len(self._buffer)))
        start = _ffi.from_buffer(self._buffer)
        got = _lib.pn_link_recv(link.raw, start + self.size, count)
        if got > 0:
            self.size += got

    def take(self) -> bytearray:
        """What has arrived (the buffer itself, cut to size, uncopied)."""
        del self._buffer[self.size :]
        return self._buffer


class Delivery:
    """One delivery (proton's ``pn_delivery_t``), received or sent."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    @property
    def pending(self) -> int:
        """Bytes received and not yet read (or not yet sent)."""
        return int(_lib.pn_delivery_pending(self.raw))

    @property
    def partial(self) -> bool:
        """More of it is to come."""
        return bool(_lib.pn_delivery_partial(self.raw))

    @property
    def aborted(self) -> bool:
        return bool(_lib.pn_delivery_aborted(self.raw))

    @property
    def settled(self) -> bool:
        """Settled by the peer."""
        return bool(_lib.pn_delivery_settled(self.raw))

    @property
    def remote_state(self) -> int:
        """The peer's outcome or state (0: none yet)."""
        return int(_lib.pn_delivery_remote_state(self.raw))

    @property
    def local_state(self) -> int:
        return int(_lib.pn_delivery_local_state(self.raw))

    @property
    def remote_offset(self) -> int:
        """The section offset of the peer's ``received`` state: how much it has."""
        return int(_lib.pn_disposition_get_section_offset(_lib.pn_delivery_remote(self.raw)))

    def received(self, offset: int) -> None:
        """Tell the peer we have ``offset`` bytes of it, leaving it unsettled (§3.4.1)."""
        local = _lib.pn_delivery_local(self.raw)
        _lib.pn_disposition_set_section_number(local, 0)
        _lib.pn_disposition_set_section_offset(local, offset)
        _lib.pn_delivery_update(self.raw, RECEIVED)

    def settle(self) -> None:
        """Settle it locally, as it stands."""
        _lib.pn_delivery_settle(self.raw)

    def abort(self) -> None:
        """Abandon a delivery we were still sending."""
        _lib.pn_delivery_abort(self.raw)

    def finish(
        self,
        outcome: int,
        *,
        failed: bool = False,
        condition: Condition | None = None,
        why: str | None = None,
    ) -> None:
        """Settle a received delivery with ``outcome``.

        ``failed`` marks a modified outcome delivery-failed, ``condition`` is
        a rejection's error, ``why`` a modified outcome's reason
        (:data:`FAILURE_ANNOTATION`).
        """
        if failed:
            _lib.pn_disposition_set_failed(_lib.pn_delivery_local(self.raw), True)
        if condition is None and why is None:
            _lib.pn_delivery_update(self.raw, outcome)
        else:
            # proton's wrapper keeps a condition and annotations on the Python side
            # and writes them into the disposition only in its own update().
            wrapped = self._proton()
            if condition is not None:
                wrapped.local.condition = condition
            if why is not None:
                wrapped.local.annotations = {symbol(FAILURE_ANNOTATION): why}
            wrapped.update(outcome)
        _lib.pn_delivery_settle(self.raw)

    def failure(self) -> str:
        """What the peer's outcome of a delivery we sent says went wrong, or ""."""
        remote = self._proton().remote
        if remote.type == REJECTED:
            condition = remote.condition
            return f"{condition.name}: {condition.description}" if condition is not None else ""
        if remote.type == MODIFIED:
            annotations = remote.annotations or {}
            return str(annotations.get(symbol(FAILURE_ANNOTATION), ""))
        return ""

    def _proton(self) -> _ProtonDelivery:
        delivery: _ProtonDelivery = _ProtonDelivery.wrap(self.raw)  # type: ignore[no-untyped-call]
        return delivery

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Delivery) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


def open_sender(
    session: Session,
    name: str,
    owner: LinkOwner,
    *,
    target: str,
    source: str | None = None,
    source_capability: str | None = None,
    target_capability: str | None = None,
) -> Link:
    """Attach a sender to ``target``, its events going to ``owner``."""
    sender = session.sender(name)
    sender.target.address = target
    if source is not None:
        sender.source.address = source
    if source_capability is not None:
        add_capability(sender.source, source_capability)
    if target_capability is not None:
        add_capability(sender.target, target_capability)
    link = handle(sender)
    link.own(owner)
    sender.open()
    return link


def open_receiver(
    session: Session,
    name: str,
    owner: LinkOwner,
    *,
    source: str | None = None,
    max_message_size: int = 0,
) -> Link:
    """Attach a receiver from ``source``, or from a dynamic address the peer makes (None)."""
    receiver = session.receiver(name)
    if source is None:
        receiver.source.dynamic = True
    else:
        receiver.source.address = source
    if max_message_size:
        receiver.max_message_size = max_message_size
    link = handle(receiver)
    link.own(owner)
    receiver.open()
    return link


def link_of(raw: Any) -> Link:
    """The one :class:`Link` for a C link handle, made at first need."""
    attrs = cproton.pn_record_get_py(_lib.pn_link_attachments(raw))
    if attrs is not None and (found := attrs.get(_HANDLE)) is not None:
        return found  # type: ignore[no-any-return]
    made = _record(raw)[_HANDLE] = Link(raw)
    return made


def handle(link: _ProtonLink) -> Link:
    """The :class:`Link` for one of proton's Python link objects."""
    return link_of(link._impl)


def owned(raw: Any) -> Link | None:
    """The :class:`Link` of a C link handle if it has an owner, else None: one lookup."""
    attrs = cproton.pn_record_get_py(_lib.pn_link_attachments(raw))
    if attrs is None:
        return None
    found: Link | None = attrs.get(_HANDLE)
    return found if found is not None and found.owner is not None else None


def forget(raw: Any) -> None:
    """Drop the handle kept in a link's record, and with it the owner (before it is freed)."""
    attrs = cproton.pn_record_get_py(_lib.pn_link_attachments(raw))
    if attrs is not None and (found := attrs.pop(_HANDLE, None)) is not None:
        found.owner = None


def _record(raw: Any) -> dict[str, Any]:
    # proton keeps one dict per link in its record for Python attributes:
    # the same one its wrappers' setattr fills.
    wrapped = _ProtonLink.wrap(raw)  # type: ignore[no-untyped-call]
    attrs: dict[str, Any] = wrapped._attrs
    return attrs


def _address(terminus: Terminus) -> str | None:
    address = terminus.address
    return None if address is None else str(address)


# -- terminus helpers ------------------------------------------------------------
def capabilities(terminus: Terminus) -> set[str]:
    """The symbols in a terminus's capabilities (a single symbol or an array)."""
    data: Data = terminus.capabilities
    data.rewind()
    if data.next() is None:
        return set()
    value = data.get_object()
    if isinstance(value, str):
        return {str(value)}
    if isinstance(value, Iterable):
        return {str(v) for v in value}
    return set()


def add_capability(terminus: Terminus, name: str) -> None:
    """Append ``name`` to a terminus's capabilities, keeping what is there."""
    names = sorted(capabilities(terminus) | {name})
    data: Data = terminus.capabilities
    data.clear()
    data.put_array(False, Data.SYMBOL)
    data.enter()
    for item in names:
        data.put_symbol(symbol(item))
    data.exit()
