"""permessage-deflate negotiation (RFC 7692 §5-7) and the extension header parser of gateway.deflate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.headers import build_extension, parse_extension

from gateway.deflate import DeflateParams, ExtensionOffer, negotiate, parse_extensions

BASE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def test_bare_offer_gets_both_no_context_takeover() -> None:
    # RFC 7692 §7.1.1.1 and §7.1.1.2: the server may add both parameters to an offer that had neither.
    assert negotiate(["permessage-deflate"]) == (DeflateParams(15, 15), BASE)


@pytest.mark.parametrize(("offer", "params", "response"), [
    # RFC 7692 §5.2 / §7.1.2.2: what browsers send; the parameter without a value must not be answered with
    # one the client did not offer, and we do not need to restrict the client's window.
    ("permessage-deflate; client_max_window_bits", DeflateParams(15, 15), BASE),
    ("permessage-deflate; client_max_window_bits=10", DeflateParams(15, 10),
     BASE + "; client_max_window_bits=10"),
    ("permessage-deflate; server_max_window_bits=10", DeflateParams(10, 15),
     BASE + "; server_max_window_bits=10"),
    ("permessage-deflate; server_max_window_bits=9", DeflateParams(9, 15),
     BASE + "; server_max_window_bits=9"),
    ("permessage-deflate; server_max_window_bits=15", DeflateParams(15, 15),
     BASE + "; server_max_window_bits=15"),
    ("permessage-deflate; client_max_window_bits=8", DeflateParams(15, 8),
     BASE + "; client_max_window_bits=8"),
    ("permessage-deflate; server_no_context_takeover", DeflateParams(15, 15), BASE),
    ("permessage-deflate; client_no_context_takeover", DeflateParams(15, 15), BASE),
    ("permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
     "server_max_window_bits=12; client_max_window_bits=11", DeflateParams(12, 11),
     BASE + "; server_max_window_bits=12; client_max_window_bits=11"),
    # Quoted values (RFC 6455 §9.1: a quoted-string whose content is a token), also with a quoted-pair.
    ('permessage-deflate; server_max_window_bits="10"', DeflateParams(10, 15),
     BASE + "; server_max_window_bits=10"),
    ('permessage-deflate; client_max_window_bits="1\\2"', DeflateParams(15, 12),
     BASE + "; client_max_window_bits=12"),
    # Case-insensitive names, whitespace around every separator.
    ("PerMessage-Deflate; Server_Max_Window_Bits=11", DeflateParams(11, 15),
     BASE + "; server_max_window_bits=11"),
    ("  permessage-deflate ;client_max_window_bits = 13\t;\tserver_no_context_takeover  ",
     DeflateParams(15, 13), BASE + "; client_max_window_bits=13"),
])
def test_accepted_offers(offer: str, params: DeflateParams, response: str) -> None:
    assert negotiate([offer]) == (params, response)


@pytest.mark.parametrize("offer", [
    # RFC 7692 §7.1: unknown parameter, duplicate parameter, invalid values.
    "permessage-deflate; x-unknown",
    "permessage-deflate; mux",
    "permessage-deflate; client_max_window_bits; client_max_window_bits",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; server_max_window_bits=10; server_max_window_bits=11",
    # §7.1.1.1 / §7.1.1.2: no value allowed.
    "permessage-deflate; server_no_context_takeover=1",
    'permessage-deflate; client_no_context_takeover="true"',
    # §7.1.2.1: server_max_window_bits needs a value, 8..15, decimal without leading zeroes.
    "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=7",
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; server_max_window_bits=010",
    "permessage-deflate; server_max_window_bits=09",
    "permessage-deflate; server_max_window_bits=+9",
    "permessage-deflate; server_max_window_bits=9.0",
    "permessage-deflate; server_max_window_bits=0x0a",
    "permessage-deflate; server_max_window_bits=\u0661\u0660",  # Arabic-Indic "10": not a token, not decimal
    # §7.1.2.2: when client_max_window_bits has a value it follows the same rule.
    "permessage-deflate; client_max_window_bits=7",
    "permessage-deflate; client_max_window_bits=16",
    "permessage-deflate; client_max_window_bits=ten",
    'permessage-deflate; client_max_window_bits=""',
    'permessage-deflate; client_max_window_bits="1 0"',
    # We cannot compress raw DEFLATE within 256 bytes (zlib), so a peer holding us to 8 is declined.
    "permessage-deflate; server_max_window_bits=8",
    # Not this extension, or not well-formed.
    "x-webkit-deflate-frame",
    "permessage-deflate=1",
    "permessage-deflate; ",
    "permessage-deflate server_max_window_bits=10",
])
def test_declined_offers(offer: str) -> None:
    assert negotiate([offer]) is None
    # A declined offer does not spoil a later acceptable one (RFC 7692 §5: offers in preference order).
    assert negotiate([offer + ", permessage-deflate"]) == (DeflateParams(15, 15), BASE)


def test_unterminated_quote_swallows_the_rest_of_its_header_only() -> None:
    offer = 'permessage-deflate; server_max_window_bits="10, permessage-deflate'
    assert negotiate([offer]) is None
    assert negotiate([offer, "permessage-deflate; client_max_window_bits=9"]) == (
        DeflateParams(15, 9), BASE + "; client_max_window_bits=9")


def test_first_acceptable_offer_wins() -> None:
    # RFC 7692 §5.2: the client lists fallbacks in preference order.
    header = ("permessage-deflate; server_max_window_bits=10; client_max_window_bits, "
              "permessage-deflate; client_max_window_bits")
    assert negotiate([header]) == (DeflateParams(10, 15), BASE + "; server_max_window_bits=10")
    header = "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9"
    assert negotiate([header]) == (DeflateParams(9, 15), BASE + "; server_max_window_bits=9")


def test_offers_across_several_headers_after_other_extensions() -> None:
    headers = ["x-webkit-deflate-frame, foo; bar=baz", "permessage-deflate; unknown=1",
               "permessage-deflate; client_max_window_bits=14, permessage-deflate"]
    assert negotiate(headers) == (DeflateParams(15, 14), BASE + "; client_max_window_bits=14")


def test_commas_inside_quotes_do_not_split_offers() -> None:
    # The quoted value holds a comma, so it is no token (RFC 6455 §9.1) and its element is dropped; the offer
    # that seems to sit inside the quotes must not come out of it.
    header = ('permessage-deflate; x="a, permessage-deflate; server_max_window_bits=9, b", '
              'permessage-deflate; server_max_window_bits=11')
    assert parse_extensions([header]) == [
        ExtensionOffer("permessage-deflate", (("server_max_window_bits", "11"),)),
    ]
    assert negotiate([header]) == (DeflateParams(11, 15), BASE + "; server_max_window_bits=11")


def test_malformed_elements_are_dropped_and_parsing_resumes() -> None:
    headers = ["@@@, ;x, permessage-deflate; a=\x01, foo;;bar", ", ,  ,", "", "Foo ; A = \"b\\c\" , x"]
    assert parse_extensions(headers) == [
        ExtensionOffer("foo", (("a", "bc"),)),  # quoted-pair unescaped
        ExtensionOffer("x", ()),
    ]


def test_a_bare_string_is_refused() -> None:
    with pytest.raises(TypeError):
        negotiate("permessage-deflate")


def test_no_offer_or_disabled() -> None:
    assert negotiate([]) is None
    assert negotiate([""]) is None
    assert negotiate([" , "]) is None
    assert negotiate(["permessage-deflate"], enabled=False) is None


@pytest.mark.parametrize(("offer", "params", "response"), [
    ("permessage-deflate", DeflateParams(12, 15), BASE + "; server_max_window_bits=12"),
    ("permessage-deflate; server_max_window_bits=15", DeflateParams(12, 15),
     BASE + "; server_max_window_bits=12"),
    ("permessage-deflate; server_max_window_bits=10", DeflateParams(10, 15),
     BASE + "; server_max_window_bits=10"),
])
def test_configured_window_cap(offer: str, params: DeflateParams, response: str) -> None:
    # RFC 7692 §7.1.2.1: the server may answer with a smaller value than offered, or announce one unasked.
    assert negotiate([offer], max_window_bits=12) == (params, response)


@pytest.mark.parametrize("bits", [8, 16])
def test_configured_window_cap_is_checked(bits: int) -> None:
    with pytest.raises(ValueError, match="max_window_bits"):
        negotiate(["permessage-deflate"], max_window_bits=bits)


CLIENT_CONFIGS = [
    {"server_no_context_takeover": snct, "client_no_context_takeover": cnct,
     "server_max_window_bits": smwb, "client_max_window_bits": cmwb}
    for snct in (False, True)
    for cnct in (False, True)
    for smwb in (None, 8, 9, 12, 15)
    for cmwb in (None, True, 9, 11, 15)  # the websockets client cannot offer 8
]


@pytest.mark.parametrize("config", CLIENT_CONFIGS)
def test_websockets_client_accepts_our_answer(config: dict[str, object]) -> None:
    # Interop: whatever the `websockets` client offers, our answer passes its own validation, and what it then
    # agrees to matches our DeflateParams.
    factory = ClientPerMessageDeflateFactory(**config)  # type: ignore[arg-type]
    offer = build_extension([(factory.name, factory.get_request_params())])
    result = negotiate([offer])
    if config["server_max_window_bits"] == 8:
        assert result is None
        return
    assert result is not None
    params, response = result
    [(_, response_params)] = parse_extension(response)
    extension = factory.process_response_params(response_params, [])
    assert extension.remote_no_context_takeover
    assert extension.local_no_context_takeover
    assert extension.remote_max_window_bits == params.server_max_window_bits
    assert extension.local_max_window_bits == params.client_max_window_bits


# Grammar-level cross-check of the parser against `websockets`' own header parser on well-formed headers.
_TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=8)
_OWS = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def _header(draw: st.DrawFn) -> tuple[str, list[ExtensionOffer]]:
    parts: list[str] = []
    expected: list[ExtensionOffer] = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(_TOKEN)
        text = name
        params: list[tuple[str, str | None]] = []
        for _ in range(draw(st.integers(0, 4))):
            pname = draw(_TOKEN)
            text += draw(_OWS) + ";" + draw(_OWS) + pname
            value = draw(st.none() | _TOKEN)
            if value is not None:
                quoted = draw(st.booleans())
                text += "=" + (f'"{value}"' if quoted else value)
            params.append((pname.lower(), value))
        parts.append(text)
        expected.append(ExtensionOffer(name.lower(), tuple(params)))
    sep = draw(_OWS) + "," + draw(_OWS)
    return sep.join(parts), expected


@given(_header())
def test_parser_agrees_with_websockets(case: tuple[str, list[ExtensionOffer]]) -> None:
    header, expected = case
    assert parse_extensions([header]) == expected
    theirs = [ExtensionOffer(name.lower(), tuple((p.lower(), v) for p, v in params))
              for name, params in parse_extension(header)]
    assert theirs == expected


@given(st.text(max_size=80))
def test_parser_and_negotiation_never_raise(header: str) -> None:
    offers = parse_extensions([header])
    assert all(offer.name == offer.name.lower() for offer in offers)
    result = negotiate([header])
    if result is not None:
        params, response = result
        assert 9 <= params.server_max_window_bits <= 15
        assert 8 <= params.client_max_window_bits <= 15
        assert parse_extensions([response])[0].name == "permessage-deflate"
