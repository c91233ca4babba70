"""Sans-IO: remote-access profiles. Several ``remote_addrs = %any`` connections on one responder; IKE_AUTH
picks each client's by its identity (IDi), the IDr it asks for and how it authenticates (PSK or certificate),
and the IKE SA switches to it: pool, child SA, traffic selectors and name are that connection's."""

from __future__ import annotations

import time

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import auth
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.certs import ca_hash
from ipsecstack.ike.const import IdType, Protocol
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.model import ID_MATCH_ANY, ID_MATCH_EXACT, is_wildcard, match_identity
from ipsecstack.ike.pools import Pool
from ipsecstack.ike.session import ChildUp, IkeDown, IkeSa, IkeUp, PeerConfig, identity
from tests.ike.helpers import B, ike_config
from tests.pkiutil import Issued, issue

ROOT = issue("Profiles Root CA", ca=True)
GW = issue("gw.example", ROOT, san=("gw.example",))
CARL = issue("carl", ROOT, san=("carl@example",))
STRANGER = issue("eve", issue("Other Root CA", ca=True), san=("eve@example",))


def _dn(who: Issued) -> tuple[int, bytes]:
    return IdType.ID_DER_ASN1_DN, who.cert.subject.public_bytes()


def _gateway(name: str, remote_id: str | None, pool: str, lan: str, *, psk: bytes = b"",
             certs: bool = False, ike: str = "aes128gcm16-prfsha256-x25519") -> PeerConfig:  # fmt: skip
    gw = ike_config(B, "0.0.0.0", lan, "0.0.0.0/0", psk=psk, remote_id=remote_id, ike=ike)
    gw.name, gw.remote_addr, gw.local_id = name, None, identity("gw.example")
    gw.pools = [Pool.parse(name, pool, [], f"pools.{name}")]
    if certs:  # both sides by certificate; our identity is our certificate's DN
        gw.creds = auth.Credentials("pubkey", "pubkey", GW.key, (GW.cert,), cacerts=(ROOT.cert,))
        gw.local_id = _dn(GW)
    return gw


def _profiles() -> list[PeerConfig]:
    return [
        _gateway("psk-a", "client-a@example", "10.9.1.0/30", "10.1.0.0/16", psk=b"secret of group a"),
        _gateway("psk-b", "client-b@example", "10.9.2.0/30", "10.2.0.0/16", psk=b"secret of group b"),
        _gateway("certs", None, "10.9.3.0/30", "10.3.0.0/16", certs=True),
    ]


def _client(ident: str | Issued, *, psk: bytes = b"", remote_id: str | None = None,
            ike: str = "aes128gcm16-prfsha256-x25519") -> PeerConfig:  # fmt: skip
    c = ike_config("0.0.0.0", B, "0.0.0.0/0", "10.0.0.0/8", psk=psk, remote_id=remote_id, ike=ike)
    c.request_vip = True
    if isinstance(ident, Issued):
        c.creds = auth.Credentials("pubkey", "pubkey", ident.key, (ident.cert,), cacerts=(ROOT.cert,))
        c.local_id = _dn(ident)
    else:
        c.local_id = identity(ident)
    return c


class Net:
    """A responder (the gateway at B) and clients at 198.51.100.x, datagrams moved by address."""

    def __init__(self, profiles: list[PeerConfig]) -> None:
        self.gw = IkeManager(profiles, seeded_rng(5), wallclock=time.time)
        self.clients: dict[str, IkeManager] = {}
        self.events: list[object] = []

    def connect(self, cfg: PeerConfig) -> IkeSa:
        addr = f"198.51.100.{len(self.clients) + 1}"
        cfg.local_addr = addr
        client = IkeManager([cfg], seeded_rng(50 + len(self.clients)), wallclock=time.time)
        self.clients[addr] = client
        sa = client.initiate(cfg.name, 0.0)
        for _ in range(10):  # bounded
            moved = False
            for d in client.datagrams():
                moved = True
                self.gw.receive(d.data, addr, d.src_port, d.dst_port, 0.0)
            for d in self.gw.datagrams():
                moved = True
                self.clients[d.dst].receive(d.data, B, d.src_port, d.dst_port, 0.0)
            self.events += self.gw.events()
            if not moved:
                break
        return sa

    def responder(self, client: IkeSa) -> IkeSa:
        return next(sa for sa in self.gw.sas.values() if sa.spi_i == client.spi_i)

    def down(self) -> list[IkeDown]:
        return [e for e in self.events if isinstance(e, IkeDown)]


def test_each_client_gets_its_own_profile() -> None:
    net = Net(_profiles())
    a = net.connect(_client("client-a@example", psk=b"secret of group a"))
    b = net.connect(_client("client-b@example", psk=b"secret of group b"))
    c = net.connect(_client(CARL, remote_id="C=CH, O=ipsecstack test, CN=gw.example"))
    assert not net.down(), net.down()
    want = {"psk-a": ("10.9.1.1", "10.1.0.0/16"), "psk-b": ("10.9.2.1", "10.2.0.0/16"),
            "certs": ("10.9.3.1", "10.3.0.0/16")}  # fmt: skip
    ups = [e for e in net.events if isinstance(e, ChildUp)]
    for client, name in ((a, "psk-a"), (b, "psk-b"), (c, "certs")):
        vip, lan = want[name]
        assert client.established and client.virtual_ip == vip, (name, client.virtual_ip)
        r = net.responder(client)
        assert r.cfg.name == name and r.established
        assert r.switched_from == (None if name == "psk-a" else "psk-a")  # IKE_SA_INIT answered with the first
        (up,) = [e for e in ups if e.sa is r]
        assert up.child.name == "net" and [str(t) for t in up.local_ts] == [lan]
        assert [str(t) for t in up.remote_ts] == [f"{vip}/32"]  # narrowed to the lease from its own pool
        (mine,) = [e for e in net.clients[client.cfg.local_addr].events() if isinstance(e, ChildUp)]
        assert [str(t) for t in mine.remote_ts] == [lan]
    assert net.responder(c).peer_cert == CARL.cert and net.responder(c).peer_auth != "psk"
    assert c.peer_id == _dn(GW)  # the certificate profile proves itself with our certificate
    assert net.responder(a).peer_auth == net.responder(b).peer_auth == "psk"
    # the listings and the uniqueness policy see the new names
    assert [sa.cfg.name for sa in net.gw.by_name("psk-b")] == ["psk-b"]
    assert (
        net.responder(b).stats.get("connection_switched") == 1 and "connection_switched" not in net.responder(a).stats
    )


def test_ike_sa_init_asks_for_certificates_of_every_candidate() -> None:
    net = Net(_profiles())
    net.connect(_client("client-a@example", psk=b"secret of group a"))
    (client,) = net.clients["198.51.100.1"].sas.values()
    init_response = client.init_response
    req = [p for p in m.decode(init_response).payloads if isinstance(p, m.Certificate) and p.request]
    assert [p.data for p in req] == [ca_hash(ROOT.cert)]  # psk-a asks for none, "certs" does


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (
            _client("nobody@example", psk=b"secret of group a"),
            "no connection accepts it: psk-a: identity mismatch: remote.id is 'client-a@example'; psk-b: identity "
            "mismatch: remote.id is 'client-b@example'; certs: it used a pre-shared key but remote.auth = pubkey",
        ),
        (
            _client("client-b@example", psk=b"secret of group a"),  # psk-a's secret is not psk-b's
            "psk-b: AUTH does not verify: the PSK differs",
        ),
        (_client(STRANGER), "certs: no trusted CA"),
        (
            _client("client-a@example", psk=b"secret of group a", remote_id="vpn.example"),
            "psk-a: it asks for us as 'vpn.example' (IDr), local.id is 'gw.example'",
        ),
    ],
    ids=["unknown-id", "other-groups-psk", "untrusted-cert", "wrong-idr"],
)
def test_a_client_no_profile_accepts_is_refused(client: PeerConfig, reason: str) -> None:
    net = Net(_profiles())
    sa = net.connect(client)
    assert not sa.established
    mine = [e for e in net.clients[sa.cfg.local_addr].events() if isinstance(e, IkeDown)]
    assert mine and "AUTHENTICATION_FAILED" in mine[0].reason
    (down,) = net.down()
    assert reason in down.reason, down.reason
    assert not any(isinstance(e, IkeUp | ChildUp) for e in net.events)
    assert all(pool.leases == {} for cfg in net.gw.peers.values() for pool in cfg.pools)


def test_exact_identity_beats_a_pattern_which_beats_any() -> None:
    profiles = [
        _gateway("anyone", None, "10.9.1.0/30", "10.1.0.0/16", psk=b"k"),
        _gateway("domain", "*@example", "10.9.2.0/30", "10.2.0.0/16", psk=b"k"),
        _gateway("alice", "alice@example", "10.9.3.0/30", "10.3.0.0/16", psk=b"k"),
    ]
    net = Net(profiles)
    got = {who: net.responder(net.connect(_client(who, psk=b"k"))).cfg.name
           for who in ("alice@example", "bob@example", "bob@elsewhere.example")}  # fmt: skip
    assert got == {"alice@example": "alice", "bob@example": "domain", "bob@elsewhere.example": "anyone"}


def test_a_profile_whose_proposals_lack_the_chosen_one_is_skipped() -> None:
    profiles = [
        _gateway("psk-a", "client-a@example", "10.9.1.0/30", "10.1.0.0/16", psk=b"k",
                 ike="aes128gcm16-prfsha256-x25519,aes256-sha256-modp2048"),
        _gateway("b-strict", "client-b@example", "10.9.2.0/30", "10.2.0.0/16", psk=b"k", ike="aes256-sha256-modp2048"),
        _gateway("b-any", None, "10.9.3.0/30", "10.3.0.0/16", psk=b"k"),
    ]  # fmt: skip
    net = Net(profiles)
    sa = net.connect(_client("client-b@example", psk=b"k"))  # offers AES-GCM: psk-a chooses it in IKE_SA_INIT
    assert sa.established and net.responder(sa).cfg.name == "b-any"
    assert sa.chosen is not None and sa.chosen.describe() == "aes128gcm16-prfsha256-curve25519"


def test_ike_sa_init_picks_a_connection_whose_proposals_fit() -> None:
    profiles = [
        _gateway("gcm", "client-a@example", "10.9.1.0/30", "10.1.0.0/16", psk=b"k"),
        _gateway("cbc", "client-b@example", "10.9.2.0/30", "10.2.0.0/16", psk=b"k", ike="aes256-sha256-modp2048"),
    ]
    net = Net(profiles)
    sa = net.connect(_client("client-b@example", psk=b"k", ike="aes256-sha256-modp2048"))
    assert sa.established and net.responder(sa).cfg.name == "cbc" and net.responder(sa).switched_from is None


def test_one_connection_behaves_as_before() -> None:
    net = Net(_profiles()[:1])
    sa = net.connect(_client("client-b@example", psk=b"secret of group a"))
    assert not sa.established
    (down,) = net.down()
    assert down.reason == "authentication of 'client-b@example' failed: identity mismatch: remote.id is " \
                          "'client-a@example'"  # fmt: skip


def test_wildcard_remote_id_on_the_initiator() -> None:
    # a client accepting any gateway of a domain: it sends no IDr and checks the gateway's IDr against the pattern
    gw = _gateway("gw", None, "10.9.1.0/30", "10.1.0.0/16", psk=b"k")
    net = Net([gw])
    ok = net.connect(_client("client@example", psk=b"k", remote_id="*.example"))
    assert ok.established
    responder_saw = net.responder(ok)
    assert responder_saw.cfg.name == "gw"
    bad = net.connect(_client("client@example", psk=b"k", remote_id="*.elsewhere"))
    assert not bad.established
    downs = [e for e in net.clients[bad.cfg.local_addr].events() if isinstance(e, IkeDown)]
    assert any("identity mismatch: remote.id is '*.elsewhere'" in e.reason for e in downs)


def test_match_identity() -> None:
    alice = identity("alice@example.com")
    assert match_identity(None, alice) == ID_MATCH_ANY
    assert match_identity(alice, alice) == ID_MATCH_EXACT
    assert match_identity(identity("bob@example.com"), alice) == 0
    one = match_identity(identity("*@example.com"), alice)
    two = match_identity(identity("*@*.com"), alice)
    assert ID_MATCH_EXACT > one > two > ID_MATCH_ANY
    assert match_identity(identity("*@EXAMPLE.com"), alice) == one  # case-insensitive, as DNS
    assert match_identity(identity("*@example.com"), identity("alice@example.org")) == 0
    assert match_identity(identity("*.example.com"), identity("vpn.example.com")) == one
    assert match_identity(identity("*.example.com"), alice) == 0  # an FQDN pattern matches FQDNs only
    dn = identity("C=CH, O=example, CN=carl")
    assert match_identity(identity("C=CH, O=example, CN=*"), dn) == one
    assert match_identity(identity("C=CH,O=example,CN=*"), dn) == one
    assert match_identity(identity("C=CH, O=other, CN=*"), dn) == 0
    assert match_identity(identity("C=CH, CN=*"), dn) == 0  # the same attributes, in order
    assert match_identity(identity("a.b+c"), identity("a.b+c")) == ID_MATCH_EXACT  # no regex surprises
    assert match_identity(identity("*.b"), identity("a.b+c")) == 0
    assert is_wildcard(identity("*@example.com")) and not is_wildcard(alice) and not is_wildcard(None)


def test_certreqs_of_several_connections() -> None:
    other = issue("Other CA", ca=True)
    a = auth.Credentials("psk", "pubkey", cacerts=(ROOT.cert, other.cert))
    b = auth.Credentials("psk", "pubkey", cacerts=(other.cert,))
    psk = auth.Credentials()
    assert auth.certreqs([a]) == a.certreq()
    (req,) = auth.certreqs([psk, b, a])
    assert isinstance(req, m.Certificate) and req.data == ca_hash(other.cert) + ca_hash(ROOT.cert)
    assert auth.certreqs([psk, psk]) == []


def test_chosen_proposal_fits_its_own_connection() -> None:
    from ipsecstack.ike.profiles import ike_proposal_fits

    cfg = _gateway(
        "x", None, "10.9.1.0/30", "10.1.0.0/16", psk=b"k", ike="aes256-sha256-modp2048,aes128gcm16-prfsha256-x25519"
    )
    for text in ("aes256-sha256-modp2048", "aes128gcm16-prfsha256-x25519"):
        offer = props.parse(text, Protocol.IKE).to_payload(1, b"")
        chosen = props.select(cfg.proposals, [offer], Protocol.IKE)
        assert chosen is not None and ike_proposal_fits(cfg, chosen)
        other = _gateway("y", None, "10.9.1.0/30", "10.1.0.0/16", psk=b"k", ike="chacha20poly1305-prfsha256-ecp256")
        assert not ike_proposal_fits(other, chosen)


def test_patterns_take_linear_time_on_hostile_identities() -> None:
    # IDi comes from a peer not yet authenticated: a backtracking matcher would take minutes here
    start = time.monotonic()
    for pattern, hostile in (("*@*.com", "@" * 60_000), ("*@*@*.x", "@" * 60_000), ("*a*a*b", "a" * 60_000)):
        assert match_identity(identity(pattern), identity(hostile)) == 0
    assert time.monotonic() - start < 1.0
    assert (
        match_identity(identity("a*b*c"), identity("aXbYbZc"))
        and match_identity(identity("ab*ba"), identity("aba")) == 0
    )


def test_an_idr_in_our_certificate_is_the_identity_we_answer_with() -> None:
    # strongSwan asks for "gw.example" (a subjectAltName of our certificate) and insists on getting exactly it
    net = Net(_profiles())
    sa = net.connect(_client(CARL, remote_id="gw.example"))
    assert sa.established and sa.peer_id == identity("gw.example"), sa.events()
    r = net.responder(sa)
    assert r.cfg.name == "certs" and r.local_identity == identity("gw.example") and r.cfg.local_id == _dn(GW)
    plain = net.connect(_client("client-a@example", psk=b"secret of group a", remote_id="gw.example"))
    assert plain.established and net.responder(plain).local_identity == identity("gw.example")


def test_a_reload_leaves_no_stale_candidate() -> None:
    # IKE_SA_INIT happened under the old configuration; psk-b changed (new secret) before IKE_AUTH arrives
    profiles = _profiles()
    net = Net(profiles)
    client = _client("client-b@example", psk=b"secret of group b")
    client.local_addr = "198.51.100.9"
    cm = IkeManager([client], seeded_rng(77), wallclock=time.time)
    net.clients[client.local_addr] = cm
    sa = cm.initiate(client.name, 0.0)
    for d in cm.datagrams():
        net.gw.receive(d.data, client.local_addr, d.src_port, d.dst_port, 0.0)
    renewed = _gateway("psk-b", "client-b@example", "10.9.2.0/30", "10.2.0.0/16", psk=b"new secret of group b")
    net.gw.peers = {**net.gw.peers, "psk-b": renewed}
    for _ in range(4):
        for d in net.gw.datagrams():
            cm.receive(d.data, B, d.src_port, d.dst_port, 0.0)
        for d in cm.datagrams():
            net.gw.receive(d.data, client.local_addr, d.src_port, d.dst_port, 0.0)
    assert not sa.established and not cm.sas  # refused, closed and forgotten
    (down,) = [e for e in net.gw.events() if isinstance(e, IkeDown)]
    assert "psk-a: identity mismatch" in down.reason and "psk-b" not in down.reason, down.reason
