"""The embedded backend's JMAP methods through EmbeddedBackend.call: RFC 8620 Core and RFC 8621 Mail."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.admission import check_request
from gateway.backend.delivery import UnknownRecipient
from gateway.backend.service import EmbeddedBackend
from gateway.directory import account_id_for
from gateway.errors import HTTPProblem
from gateway.jmap.types import CORE, MAIL, SUBMISSION, VACATION, WEBSOCKET, ApiRequest
from gateway.upstream.base import RequestPath, SessionContext
from tests.unit.test_backend_support import (
    ALICE,
    BOB,
    MULTIPART,
    PDF_BYTES,
    Client,
    Env,
    deliver,
    message,
)

# --- capabilities and session ---

def test_capabilities(env: Env) -> None:
    backend: RequestPath = env.backend  # mypy checks that the backend is a RequestPath
    principal = env.directory.principal(BOB)
    ctx = SessionContext("http://gw.example", "ws://gw.example/jmap/ws", env.settings)
    session = backend.session_resource(principal, ctx)
    assert {k: v for k, v in session["capabilities"].items() if k not in (CORE, WEBSOCKET)} == {
        MAIL: {}, SUBMISSION: {}, VACATION: {}}
    account = session["accounts"][principal.accounts[0].id]["accountCapabilities"]
    mail = account[MAIL]
    # RFC 8621 §1.3.1: every field of the account capability is present.
    assert set(mail) == {"maxMailboxesPerEmail", "maxMailboxDepth", "maxSizeMailboxName",
                         "maxSizeAttachmentsPerEmail", "emailQuerySortOptions", "mayCreateTopLevelMailbox"}
    assert mail["maxSizeMailboxName"] >= 100 and "receivedAt" in mail["emailQuerySortOptions"]
    assert account[SUBMISSION] == {"maxDelayedSend": 0, "submissionExtensions": {}}
    assert session["primaryAccounts"][MAIL] == principal.accounts[0].id
    # What admission checks `using` against: core, websocket plus these.
    check_request(ApiRequest(using=[CORE, WEBSOCKET, MAIL, SUBMISSION, VACATION], methodCalls=[]),
                  backend.capabilities_for(principal), 32)


def test_session_state_follows_the_account_list(env: Env) -> None:
    before = env.backend.session_state(env.directory.principal(BOB))
    assert env.backend.session_state(env.directory.principal(BOB)) == before
    env.directory.grant(ALICE, BOB)
    assert env.backend.session_state(env.directory.principal(BOB)) != before


# --- Core/echo, dispatch, request-wide rules ---

async def test_echo_and_unknown_methods(bob: Client) -> None:
    response = await bob.request([("Core/echo", {"hello": [1, True]}, "e"),
                                  ("Email/frobnicate", {}, "x"),
                                  ("Mailbox/get", {"accountId": bob.account_id}, "m")], using=[CORE])
    echo, unknown, needs_mail = response.methodResponses
    assert echo == ("Core/echo", {"hello": [1, True]}, "e")
    assert unknown[0] == "error" and unknown[1]["type"] == "unknownMethod" and unknown[2] == "x"
    # RFC 8620 §3.6.2: a method whose capability is not in `using` is unknownMethod.
    assert needs_mail[1]["type"] == "unknownMethod" and MAIL in needs_mail[1]["description"]
    assert response.sessionState == bob.env.backend.session_state(bob.principal)


async def test_capability_per_method(bob: Client) -> None:
    assert (await bob.error("Identity/get", using=[CORE, MAIL]))["type"] == "unknownMethod"
    assert (await bob.error("VacationResponse/get", using=[CORE, MAIL]))["type"] == "unknownMethod"
    assert (await bob.call("Identity/get", using=[CORE, SUBMISSION]))["list"]
    assert (await bob.call("VacationResponse/get", using=[CORE, VACATION]))["list"]


async def test_account_not_found_and_bad_arguments(bob: Client) -> None:
    assert (await bob.error("Mailbox/get", account=account_id_for(ALICE)))["type"] == "accountNotFound"
    assert (await bob.error("Mailbox/get", account="nope"))["type"] == "accountNotFound"
    missing = await bob.request([("Mailbox/get", {}, "0")])
    assert missing.methodResponses[0][1]["type"] == "invalidArguments"
    unknown = await bob.error("Mailbox/get", {"idz": None})
    assert unknown["type"] == "invalidArguments" and "idz" in unknown["description"]
    bad_type = await bob.error("Email/get", {"ids": "M1"})
    assert bad_type["type"] == "invalidArguments" and "ids" in bad_type["description"]
    bad_prop = await bob.error("Mailbox/get", {"properties": ["name", "colour"]})
    assert bad_prop["type"] == "invalidArguments" and "colour" in bad_prop["description"]
    bad_header = await bob.error("Email/get", {"ids": [], "properties": ["header:From:asDate"]})
    assert bad_header["type"] == "invalidArguments" and "header:From:asDate" in bad_header["description"]


async def test_request_too_large(bob: Client, env: Env) -> None:
    ids = [f"M{i}" for i in range(env.settings.max_objects_in_get + 1)]
    assert (await bob.error("Email/get", {"ids": ids}))["type"] == "requestTooLarge"
    destroy = [f"M{i}" for i in range(env.settings.max_objects_in_set + 1)]
    assert (await bob.error("Email/set", {"destroy": destroy}))["type"] == "requestTooLarge"
    for i in range(env.settings.max_objects_in_get + 1):
        await deliver(env, message(f"m{i}"))
    assert (await bob.error("Email/get", {"ids": None}))["type"] == "requestTooLarge"


async def test_result_references_between_calls(bob: Client, env: Env) -> None:
    first = await deliver(env, message("first", message_id="<r1@example.com>"))
    await deliver(env, message("Re: first", in_reply_to="<r1@example.com>"))
    response = await bob.request([
        ("Email/query", {"accountId": bob.account_id, "filter": {"subject": "first"},
                         "sort": [{"property": "receivedAt"}]}, "q"),
        ("Email/get", {"accountId": bob.account_id, "properties": ["threadId"],
                       "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"}}, "g"),
        ("Thread/get", {"accountId": bob.account_id,
                        "#ids": {"resultOf": "g", "name": "Email/get", "path": "/list/*/threadId"}}, "t"),
        ("Email/get", {"accountId": bob.account_id,
                       "#ids": {"resultOf": "t", "name": "Thread/get", "path": "/list/*/emailIds"}}, "g2"),
        ("Email/get", {"accountId": bob.account_id,
                       "#ids": {"resultOf": "q", "name": "Email/get", "path": "/ids"}}, "bad"),
    ])
    q, g, t, g2, bad = (r[1] for r in response.methodResponses)
    assert len(q["ids"]) == 2 and q["ids"][0] == first
    assert len(g["list"]) == 2 and g["list"][0]["threadId"] == g["list"][1]["threadId"]
    # `*` yields the shared thread id twice; RFC 8620 §5.1 answers a repeated id once.
    assert [th["emailIds"] for th in t["list"]] == [q["ids"]]
    assert [e["id"] for e in g2["list"]] == q["ids"]
    assert response.methodResponses[4][0] == "error" and bad["type"] == "invalidResultReference"


async def test_creation_ids_across_calls_and_created_ids(bob: Client) -> None:
    response = await bob.request([
        ("Mailbox/set", {"accountId": bob.account_id, "create": {"box": {"name": "Projects"}}}, "m"),
        ("Email/set", {"accountId": bob.account_id, "create": {"draft": {
            "mailboxIds": {"#box": True}, "subject": "plan", "keywords": {"$draft": True}}}}, "e"),
        ("Email/get", {"accountId": bob.account_id, "ids": ["#draft"], "properties": ["mailboxIds", "subject"]},
         "g"),
    ], created_ids={"earlier": "X1"})
    (_, m, _), (_, e, _), (_, g, _) = response.methodResponses
    box_id = m["created"]["box"]["id"]
    draft = e["created"]["draft"]
    assert g["list"] == [{"id": draft["id"], "mailboxIds": {box_id: True}, "subject": "plan"}]
    # RFC 8620 §3.3/§3.4: createdIds comes back (with the request's own entries) when it was sent.
    assert response.createdIds == {"earlier": "X1", "box": box_id, "draft": draft["id"]}
    plain = await bob.request([("Core/echo", {}, "x")])
    assert plain.createdIds is None


# --- Mailbox ---

async def test_default_mailboxes(bob: Client) -> None:
    got = await bob.call("Mailbox/get", {"ids": None})
    roles = {m["name"]: m["role"] for m in got["list"]}
    assert roles == {"Inbox": "inbox", "Drafts": "drafts", "Sent": "sent", "Trash": "trash"}
    inbox = next(m for m in got["list"] if m["role"] == "inbox")
    assert set(inbox) == {"id", "name", "parentId", "role", "sortOrder", "totalEmails", "unreadEmails",
                          "totalThreads", "unreadThreads", "myRights", "isSubscribed"}
    assert inbox["myRights"]["mayReadItems"] and not inbox["myRights"]["mayDelete"]
    some = await bob.call("Mailbox/get", {"ids": [inbox["id"], "nope", inbox["id"], "nope"],
                                          "properties": ["name"]})
    assert some["list"] == [{"id": inbox["id"], "name": "Inbox"}] and some["notFound"] == ["nope"]


async def test_mailbox_set_create_rename_move_destroy(bob: Client) -> None:
    state = await bob.state("Mailbox")
    created = await bob.call("Mailbox/set", {"ifInState": state, "create": {
        "p": {"name": "Work"}, "c": {"name": "2024", "parentId": "#p", "sortOrder": 5}}})
    parent, child = created["created"]["p"], created["created"]["c"]
    assert created["oldState"] == state and created["newState"] != state
    assert parent["totalEmails"] == 0 and parent["isSubscribed"] is True and parent["parentId"] is None
    assert "name" not in parent and child["role"] is None
    boxes = await bob.mailboxes()
    assert boxes[child["id"]]["parentId"] == parent["id"] and boxes[child["id"]]["sortOrder"] == 5

    renamed = await bob.call("Mailbox/set", {"update": {child["id"]: {"name": "2025", "parentId": None}}})
    assert renamed["updated"] == {child["id"]: None}
    boxes = await bob.mailboxes()
    assert boxes[child["id"]]["name"] == "2025" and boxes[child["id"]]["parentId"] is None

    errors = await bob.call("Mailbox/set", {
        "create": {"dup": {"name": "Work"}, "nameless": {}, "server": {"name": "X", "totalEmails": 3},
                   "badrole": {"name": "Y", "role": "inbox"}, "orphan": {"name": "Z", "parentId": "nope"}},
        "update": {parent["id"]: {"parentId": parent["id"]}, "nope": {"name": "x"}},
    })
    assert {k: v["type"] for k, v in errors["notCreated"].items()} == {
        "dup": "invalidProperties", "nameless": "invalidProperties", "server": "invalidProperties",
        "badrole": "invalidProperties", "orphan": "invalidProperties"}
    assert errors["notCreated"]["dup"]["properties"] == ["name"]
    assert errors["notCreated"]["server"]["properties"] == ["totalEmails"]
    assert errors["notUpdated"][parent["id"]]["type"] == "invalidProperties"
    assert errors["notUpdated"]["nope"]["type"] == "notFound"

    inbox = await bob.mailbox("inbox")
    destroyed = await bob.call("Mailbox/set", {"destroy": [child["id"], parent["id"], inbox, "nope"]})
    assert sorted(destroyed["destroyed"]) == sorted([child["id"], parent["id"]])
    assert destroyed["notDestroyed"][inbox]["type"] == "forbidden"
    assert destroyed["notDestroyed"]["nope"]["type"] == "notFound"
    assert sorted(m["name"] for m in (await bob.mailboxes()).values()) == ["Drafts", "Inbox", "Sent", "Trash"]
    assert (await bob.error("Mailbox/set", {"ifInState": state}))["type"] == "stateMismatch"


async def test_inbox_keeps_its_role(bob: Client) -> None:
    inbox = await bob.mailbox("inbox")
    got = await bob.call("Mailbox/set", {"update": {inbox: {"role": None}}})
    assert got["notUpdated"][inbox]["properties"] == ["role"]


async def test_mailbox_destroy_with_children_and_emails(bob: Client, env: Env) -> None:
    made = await bob.call("Mailbox/set", {"create": {"a": {"name": "A"}, "b": {"name": "B", "parentId": "#a"},
                                                     "c": {"name": "C"}}})
    a, b, c = (made["created"][k]["id"] for k in "abc")
    inbox = await bob.mailbox("inbox")
    only_b = await deliver(env, message("only in B"))
    both = await deliver(env, message("in B and inbox"))
    await bob.call("Email/set", {"update": {only_b: {"mailboxIds": {b: True}},
                                            both: {f"mailboxIds/{b}": True}}})
    refused = await bob.call("Mailbox/set", {"destroy": [a, b]})
    assert refused["notDestroyed"][a]["type"] == "mailboxHasChild"
    assert refused["notDestroyed"][b]["type"] == "mailboxHasEmail"
    # RFC 8621 §2.5: with onDestroyRemoveEmails, emails only in B go; the others just leave B.
    done = await bob.call("Mailbox/set", {"destroy": [a, b, c], "onDestroyRemoveEmails": True})
    assert sorted(done["destroyed"]) == sorted([a, b, c])
    got = await bob.call("Email/get", {"ids": [only_b, both], "properties": ["mailboxIds"]})
    assert got["notFound"] == [only_b]
    assert got["list"] == [{"id": both, "mailboxIds": {inbox: True}}]
    assert (await bob.mailboxes())[inbox]["totalEmails"] == 1


async def test_mailbox_query(bob: Client) -> None:
    made = await bob.call("Mailbox/set", {"create": {
        "x": {"name": "Archive 2023", "sortOrder": 10}, "y": {"name": "zeta", "parentId": "#x", "sortOrder": 0},
        "z": {"name": "Alpha", "sortOrder": 10, "isSubscribed": False}}})
    x, y, z = (made["created"][k]["id"] for k in "xyz")
    inbox = await bob.mailbox("inbox")
    by_name = await bob.call("Mailbox/query", {"filter": {"name": "ARCHIVE"}})
    assert by_name["ids"] == [x]
    roles = await bob.call("Mailbox/query", {"filter": {"hasAnyRole": True}, "calculateTotal": True})
    assert roles["total"] == 4 and roles["ids"][0] == inbox
    assert (await bob.call("Mailbox/query", {"filter": {"role": "inbox"}}))["ids"] == [inbox]
    assert (await bob.call("Mailbox/query", {"filter": {"parentId": x}}))["ids"] == [y]
    none_or = {"operator": "NOT", "conditions": [{"hasAnyRole": True}, {"isSubscribed": False}]}
    assert sorted((await bob.call("Mailbox/query", {"filter": none_or}))["ids"]) == sorted([x, y])
    flat = await bob.call("Mailbox/query", {"filter": {"hasAnyRole": False},
                                            "sort": [{"property": "sortOrder"}, {"property": "name"}]})
    assert flat["ids"] == [y, z, x]
    tree = await bob.call("Mailbox/query", {"filter": {"hasAnyRole": False}, "sortAsTree": True,
                                            "sort": [{"property": "sortOrder"}, {"property": "name"}]})
    assert tree["ids"] == [z, x, y]  # the child follows its parent
    desc = await bob.call("Mailbox/query", {"filter": {"hasAnyRole": False},
                                            "sort": [{"property": "name", "isAscending": False}]})
    assert desc["ids"] == [y, x, z]
    assert (await bob.error("Mailbox/query", {"filter": {"colour": "red"}}))["type"] == "unsupportedFilter"
    assert (await bob.error("Mailbox/query", {"sort": [{"property": "colour"}]}))["type"] == "unsupportedSort"
    changes = await bob.error("Mailbox/queryChanges", {"sinceQueryState": desc["queryState"]})
    assert changes["type"] == "cannotCalculateChanges"


# --- Email/get ---

async def test_email_get_default_properties_and_bodies(bob: Client, env: Env) -> None:
    email_id = await deliver(env, MULTIPART)
    email = await bob.email(email_id)
    # RFC 8621 §4.2: the default property list.
    assert set(email) == {"id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt",
                          "messageId", "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo",
                          "subject", "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody",
                          "attachments"}
    assert email["subject"] == "Quarterly réport" and email["size"] == len(MULTIPART)
    assert email["mailboxIds"] == {await bob.mailbox("inbox"): True} and email["keywords"] == {}
    assert email["receivedAt"].endswith("Z") and email["sentAt"] == "2024-01-02T10:00:00+01:00"
    assert email["bodyValues"] == {}
    assert [p["type"] for p in email["textBody"]] == ["text/plain"]
    assert [p["type"] for p in email["htmlBody"]] == ["text/html"]
    [pdf] = email["attachments"]
    assert set(pdf) == {"partId", "blobId", "size", "name", "type", "charset", "disposition", "cid", "language",
                        "location"}
    assert pdf["name"] == "report.pdf"

    text = await bob.email(email_id, "bodyValues", fetchTextBodyValues=True)
    assert [v["value"] for v in text["bodyValues"].values()] == ["The réport is attached."]
    html = await bob.email(email_id, "bodyValues", "htmlBody", fetchHTMLBodyValues=True, maxBodyValueBytes=6)
    [value] = html["bodyValues"].values()
    assert value == {"value": "<html>", "isEncodingProblem": False, "isTruncated": True}
    everything = await bob.email(email_id, "bodyValues", fetchAllBodyValues=True)
    assert len(everything["bodyValues"]) == 2

    custom = await bob.email(email_id, "bodyStructure", "headers", "header:Subject:asText",
                             "header:list-unsubscribe:asURLs:all", bodyProperties=["type", "header:Content-Type"])
    assert custom["header:Subject:asText"] == "Quarterly réport"
    assert custom["header:list-unsubscribe:asURLs:all"] == [["mailto:leave@example.com",
                                                             "https://example.com/leave"]]
    assert custom["headers"][0] == {"name": "From", "value": " Alice <alice@example.com>"}
    tree = custom["bodyStructure"]
    assert tree["type"] == "multipart/mixed" and [s["type"] for s in tree["subParts"]] == [
        "multipart/alternative", "application/pdf"]
    assert tree["subParts"][1]["header:Content-Type"].strip().startswith("application/pdf")
    assert set(tree["subParts"][1]) == {"type", "header:Content-Type"}


async def test_download(bob: Client, env: Env) -> None:
    email_id = await deliver(env, MULTIPART)
    email = await bob.email(email_id, "blobId", "attachments")
    backend: EmbeddedBackend = env.backend

    async def fetch(principal: Any, account: str, blob: str, content_type: str = "") -> tuple[str, bytes]:
        answer = await backend.download(principal, account, blob, "x", content_type)
        assert answer.status == 200
        return answer.headers["Content-Type"], b"".join([c async for c in answer.chunks])

    assert await fetch(bob.principal, bob.account_id, email["blobId"]) == ("message/rfc822", MULTIPART)
    pdf_blob = email["attachments"][0]["blobId"]
    assert await fetch(bob.principal, bob.account_id, pdf_blob, "application/pdf") == ("application/pdf", PDF_BYTES)
    alice = env.directory.principal(ALICE)
    for principal, account, blob in ((alice, bob.account_id, email["blobId"]),  # not her account
                                     (alice, alice.account_ids[0], email["blobId"]),  # not in her account
                                     (bob.principal, bob.account_id, "Gnope")):
        with pytest.raises(HTTPProblem) as info:
            await backend.download(principal, account, blob, "x", "")
        assert info.value.status == 404


# --- Email/query ---

async def test_email_query_filters_sorts_and_paging(bob: Client, env: Env) -> None:
    ids = {}
    ids["a"] = await deliver(env, message("Apples", "red fruit", sender="ann@example.com"))
    ids["b"] = await deliver(env, message("Bananas", "yellow fruit", sender="ben@example.com"))
    ids["c"] = await deliver(env, message("Cherries", "small red things", to="team@example.com"))
    ids["d"] = await deliver(env, MULTIPART)
    inbox = await bob.mailbox("inbox")
    made = await bob.call("Mailbox/set", {"create": {"k": {"name": "Keep"}}})
    keep = made["created"]["k"]["id"]
    await bob.call("Email/set", {"update": {ids["a"]: {"keywords/$seen": True, f"mailboxIds/{keep}": True},
                                            ids["b"]: {"keywords": {"$flagged": True, "$seen": True}}}})

    async def q(filter_: Any = None, **args: Any) -> list[str]:
        got = await bob.call("Email/query", {"filter": filter_, "sort": [{"property": "receivedAt"}], **args})
        return list(got["ids"])

    order = [ids[k] for k in "abcd"]
    assert await q() == order
    assert await q({"inMailbox": keep}) == [ids["a"]]
    assert await q({"inMailbox": inbox}) == order
    assert await q({"inMailboxOtherThan": [inbox]}) == [ids["a"]]
    assert await q({"text": "RED"}) == [ids["a"], ids["c"]]
    assert await q({"body": "yellow"}) == [ids["b"]]
    assert await q({"subject": "cherr"}) == [ids["c"]]
    assert await q({"from": "ben@"}) == [ids["b"]]
    assert await q({"to": "team@"}) == [ids["c"]]
    assert await q({"hasKeyword": "$seen"}) == [ids["a"], ids["b"]]
    assert await q({"notKeyword": "$seen"}) == [ids["c"], ids["d"]]
    assert await q({"hasAttachment": True}) == [ids["d"]]
    assert await q({"minSize": 500}) == [ids["d"]]
    assert await q({"header": ["List-Unsubscribe"]}) == [ids["d"]]
    assert await q({"header": ["Subject", "BANANA"]}) == [ids["b"]]
    assert await q({"operator": "OR", "conditions": [{"subject": "apples"}, {"subject": "bananas"}]}) == \
        [ids["a"], ids["b"]]
    assert await q({"operator": "AND", "conditions": [{"text": "red"}, {"notKeyword": "$seen"}]}) == [ids["c"]]
    assert await q({"operator": "NOT", "conditions": [{"text": "red"}, {"hasKeyword": "$flagged"}]}) == \
        [ids["d"]]
    future = "2999-01-01T00:00:00Z"
    assert await q({"before": future}) == order and await q({"after": future}) == []

    desc = await bob.call("Email/query", {"sort": [{"property": "receivedAt", "isAscending": False}]})
    assert desc["ids"] == order[::-1]
    by_subject = await bob.call("Email/query", {"sort": [{"property": "subject", "isAscending": False}]})
    assert by_subject["ids"] == [ids["d"], ids["c"], ids["b"], ids["a"]]
    flagged_first = await bob.call("Email/query", {"sort": [
        {"property": "hasKeyword", "keyword": "$flagged", "isAscending": False}, {"property": "receivedAt"}]})
    assert flagged_first["ids"][0] == ids["b"]

    page = await bob.call("Email/query", {"sort": [{"property": "receivedAt"}], "position": 1, "limit": 2,
                                          "calculateTotal": True})
    assert page["ids"] == order[1:3] and page["position"] == 1 and page["total"] == 4 and "limit" not in page
    assert page["queryState"] == await bob.state("Email") and page["canCalculateChanges"] is False
    tail = await bob.call("Email/query", {"sort": [{"property": "receivedAt"}], "position": -1})
    assert tail["ids"] == order[3:] and tail["position"] == 3
    anchored = await bob.call("Email/query", {"sort": [{"property": "receivedAt"}], "anchor": ids["c"],
                                              "anchorOffset": -1, "limit": 2})
    assert anchored["ids"] == order[1:3] and anchored["position"] == 1

    assert (await bob.error("Email/query", {"anchor": "nope"}))["type"] == "anchorNotFound"
    assert (await bob.error("Email/query", {"filter": {"colour": 1}}))["type"] == "unsupportedFilter"
    assert (await bob.error("Email/query", {"sort": [{"property": "colour"}]}))["type"] == "unsupportedSort"
    assert (await bob.error("Email/query", {"filter": {"before": "yesterday"}}))["type"] == "invalidArguments"
    assert (await bob.error("Email/query", {"limit": -1}))["type"] == "invalidArguments"
    assert (await bob.error("Email/query", {"filter": {"operator": "XOR", "conditions": []}}))["type"] == \
        "invalidArguments"


async def test_collapse_threads(bob: Client, env: Env) -> None:
    root = await deliver(env, message("topic", message_id="<t1@example.com>"))
    reply = await deliver(env, message("Re: topic", in_reply_to="<t1@example.com>",
                                       references="<t1@example.com>"))
    other = await deliver(env, message("other"))
    got = await bob.call("Email/query", {"collapseThreads": True, "calculateTotal": True,
                                         "sort": [{"property": "receivedAt", "isAscending": False}]})
    assert got["ids"] == [other, reply] and got["total"] == 2
    assert root not in got["ids"]


# --- Email/set ---

async def test_email_set_create_draft_is_a_real_message(bob: Client, env: Env) -> None:
    drafts = await bob.mailbox("drafts")
    pdf_blob = (await bob.email(await deliver(env, MULTIPART), "attachments"))["attachments"][0]["blobId"]
    got = await bob.call("Email/set", {"create": {"d1": {
        "mailboxIds": {drafts: True}, "keywords": {"$draft": True, "$Seen": True},
        "from": [{"name": "Bob", "email": BOB}], "to": [{"email": ALICE}], "subject": "Draft plan",
        "receivedAt": "2024-03-01T10:00:00Z",
        "textBody": [{"partId": "t", "type": "text/plain"}], "bodyValues": {"t": {"value": "Let's meet."}},
        "attachments": [{"blobId": pdf_blob, "type": "application/pdf", "name": "again.pdf"}],
    }}})
    created = got["created"]["d1"]
    assert set(created) == {"id", "blobId", "threadId", "size"}
    email = await bob.email(created["id"], "subject", "keywords", "mailboxIds", "receivedAt", "from",
                            "attachments", "bodyValues", "size", fetchTextBodyValues=True)
    assert email["keywords"] == {"$draft": True, "$seen": True}  # keywords are kept lowercase
    assert email["mailboxIds"] == {drafts: True} and email["receivedAt"] == "2024-03-01T10:00:00Z"
    assert email["subject"] == "Draft plan" and email["from"] == [{"name": "Bob", "email": BOB}]
    assert next(iter(email["bodyValues"].values()))["value"].strip() == "Let's meet."
    assert email["attachments"][0]["name"] == "again.pdf" and email["size"] == created["size"]
    raw = await env.backend.blob(bob.principal, bob.account_id, created["blobId"])
    assert raw is not None and b"Subject: Draft plan\r\n" in raw and b"Message-ID: <" in raw
    assert await env.backend.blob(bob.principal, bob.account_id, email["attachments"][0]["blobId"]) == \
        PDF_BYTES


async def test_email_set_create_errors(bob: Client, env: Env) -> None:
    drafts = await bob.mailbox("drafts")
    alice_blob = (await env.client(ALICE).email(await deliver(env, MULTIPART, to=ALICE), "blobId"))["blobId"]
    got = await bob.call("Email/set", {"create": {
        "nobox": {"subject": "x"},
        "emptybox": {"mailboxIds": {}},
        "badbox": {"mailboxIds": {"nope": True}},
        "serverset": {"mailboxIds": {drafts: True}, "threadId": "T1"},
        "unknown": {"mailboxIds": {drafts: True}, "colour": "red"},
        "badkw": {"mailboxIds": {drafts: True}, "keywords": {"bad keyword": True}},
        "badfrom": {"mailboxIds": {drafts: True}, "from": [{"email": "@@"}]},
        "blob": {"mailboxIds": {drafts: True}, "attachments": [{"blobId": alice_blob}]},
    }})
    errors = got["notCreated"]
    assert {k: e["type"] for k, e in errors.items()} == {
        "nobox": "invalidProperties", "emptybox": "invalidProperties", "badbox": "invalidProperties",
        "serverset": "invalidProperties", "unknown": "invalidProperties", "badkw": "invalidProperties",
        "badfrom": "invalidProperties", "blob": "blobNotFound"}
    assert errors["serverset"]["properties"] == ["threadId"]
    assert errors["unknown"]["properties"] == ["colour"]
    assert errors["badfrom"]["properties"] == ["from"]
    assert errors["blob"]["notFound"] == [alice_blob]  # another account's blob is not Bob's to use
    assert all(e["description"] for e in errors.values())
    assert got["created"] is None and got["oldState"] == got["newState"]


async def test_email_set_update_and_destroy(bob: Client, env: Env) -> None:
    inbox, trash = await bob.mailbox("inbox"), await bob.mailbox("trash")
    email_id = await deliver(env, message())
    state = await bob.state("Email")
    got = await bob.call("Email/set", {"ifInState": state, "update": {email_id: {
        "keywords/$seen": True, "keywords/$Flagged": True, f"mailboxIds/{trash}": True,
        f"mailboxIds/{inbox}": None}}})
    assert got["updated"] == {email_id: None} and got["oldState"] == state
    email = await bob.email(email_id, "keywords", "mailboxIds")
    assert email["keywords"] == {"$seen": True, "$flagged": True} and email["mailboxIds"] == {trash: True}
    whole = await bob.call("Email/set", {"update": {email_id: {"keywords": {"$answered": True},
                                                               "mailboxIds": {inbox: True, trash: True}}}})
    assert whole["updated"] == {email_id: None}
    assert await bob.email(email_id, "keywords", "mailboxIds") == {
        "id": email_id, "keywords": {"$answered": True}, "mailboxIds": {inbox: True, trash: True}}

    bad = await bob.call("Email/set", {"update": {
        email_id: {"subject": "new"},
        "nope": {"keywords/$seen": True},
    }})
    assert bad["notUpdated"][email_id]["type"] == "invalidProperties"
    assert bad["notUpdated"][email_id]["properties"] == ["subject"]
    assert bad["notUpdated"]["nope"]["type"] == "notFound"
    patches: list[tuple[dict[str, Any], str]] = [
        ({"keywords": {}, "keywords/$seen": True}, "invalidPatch"),
        ({"keywords/$seen": False}, "invalidProperties"),
        ({"mailboxIds": {}}, "invalidProperties"),
        ({f"mailboxIds/{inbox}": None, f"mailboxIds/{trash}": None}, "invalidProperties"),
        ({"mailboxIds/nope": True}, "invalidProperties"),
        ({"colour": "red"}, "invalidProperties"),
    ]
    for patch, expected in patches:
        result = await bob.call("Email/set", {"update": {email_id: patch}})
        assert result["notUpdated"][email_id]["type"] == expected, patch

    mismatch = await bob.error("Email/set", {"ifInState": state, "destroy": [email_id]})
    assert mismatch["type"] == "stateMismatch"
    gone = await bob.call("Email/set", {"destroy": [email_id, "nope"]})
    assert gone["destroyed"] == [email_id] and gone["notDestroyed"]["nope"]["type"] == "notFound"
    assert (await bob.call("Email/get", {"ids": [email_id]}))["notFound"] == [email_id]
    boxes = await bob.mailboxes()
    assert boxes[inbox]["totalEmails"] == boxes[trash]["totalEmails"] == 0


# --- Thread, Identity, VacationResponse ---

async def test_threading_by_message_ids(bob: Client, env: Env) -> None:
    root = await deliver(env, message("plan", message_id="<p1@example.com>"))
    reply = await deliver(env, message("Re: plan", message_id="<p2@example.com>", in_reply_to="<p1@example.com>"))
    # A message that only references the reply (not the root) joins the same thread.
    second = await deliver(env, message("Re: Re: plan", references="<p2@example.com>"))
    unrelated = await deliver(env, message("plan"))  # same subject, no ids in common: its own thread
    threads = {i: (await bob.email(i, "threadId"))["threadId"] for i in (root, reply, second, unrelated)}
    assert threads[root] == threads[reply] == threads[second] != threads[unrelated]
    got = await bob.call("Thread/get", {"ids": [threads[root], "nope"]})
    assert got["list"] == [{"id": threads[root], "emailIds": [root, reply, second]}]
    assert got["notFound"] == ["nope"]
    assert len((await bob.call("Thread/get", {"ids": None}))["list"]) == 2
    # Destroying the whole thread forgets its ids: a late reply starts a fresh thread.
    await bob.call("Email/set", {"destroy": [root, reply, second]})
    late = await deliver(env, message("Re: plan", in_reply_to="<p1@example.com>"))
    assert (await bob.email(late, "threadId"))["threadId"] not in threads.values()


async def test_identity(bob: Client) -> None:
    got = await bob.call("Identity/get")
    [identity] = got["list"]
    assert identity["email"] == BOB and identity["mayDelete"] is False
    assert (await bob.call("Identity/get", {"ids": [identity["id"], "x"]}))["notFound"] == ["x"]
    same = await bob.call("Identity/changes", {"sinceState": got["state"]})
    assert same["created"] == [] and same["newState"] == got["state"]
    assert (await bob.error("Identity/changes", {"sinceState": "zzz"}))["type"] == "cannotCalculateChanges"


async def test_vacation_response(bob: Client, env: Env) -> None:
    got = await bob.call("VacationResponse/get")
    assert got["list"] == [{"id": "singleton", "isEnabled": False, "fromDate": None, "toDate": None,
                            "subject": None, "textBody": None, "htmlBody": None}]
    before = len(env.events)
    result = await bob.call("VacationResponse/set", {"ifInState": got["state"], "update": {"singleton": {
        "isEnabled": True, "subject": "Away", "toDate": "2030-01-01T00:00:00Z"}}})
    assert result["updated"] == {"singleton": None} and result["newState"] != got["state"]
    assert env.events[before:][0].typeStates == {"VacationResponse": result["newState"]}
    now = (await bob.call("VacationResponse/get", {"properties": ["isEnabled", "subject"]}))["list"]
    assert now == [{"id": "singleton", "isEnabled": True, "subject": "Away"}]
    errors = await bob.call("VacationResponse/set", {"create": {"x": {}}, "destroy": ["singleton"],
                                                     "update": {"singleton": {"isEnabled": "yes"}, "other": {}}})
    assert errors["notCreated"]["x"]["type"] == "singleton"
    assert errors["notDestroyed"]["singleton"]["type"] == "singleton"
    assert errors["notUpdated"]["singleton"]["type"] == "invalidProperties"
    assert errors["notUpdated"]["other"]["type"] == "notFound"


# --- delegation ---

async def test_delegated_account(env: Env) -> None:
    bob, alice = env.client(BOB), env.client(ALICE)
    alice_account = alice.account_id
    assert (await bob.error("Mailbox/get", account=alice_account))["type"] == "accountNotFound"
    env.directory.grant(ALICE, BOB)
    email_id = await deliver(env, message("for alice"), to=ALICE)
    got = await bob.call("Email/get", {"ids": [email_id], "properties": ["subject"]}, account=alice_account)
    assert got["list"] == [{"id": email_id, "subject": "for alice"}]
    before = len(env.events)
    await bob.call("Email/set", {"update": {email_id: {"keywords/$seen": True}}}, account=alice_account)
    # The event names the account's owner, whoever made the change.
    [event] = env.events[before:]
    assert event.username == ALICE and set(event.typeStates) == {"Email", "Mailbox"}
    states = await env.backend.current_states(bob.principal, [alice_account, bob.account_id, "nope"])
    assert set(states) == {alice_account, bob.account_id}
    env.directory.revoke(ALICE, BOB)
    assert (await bob.error("Email/get", {"ids": [email_id]}, account=alice_account))["type"] == \
        "accountNotFound"
    assert await env.backend.current_states(bob.principal, [alice_account]) == {}


async def test_deliver_rejects_unknown_recipients(env: Env) -> None:
    with pytest.raises(UnknownRecipient):
        await env.backend.deliver([BOB, "stranger@example.com"], message())
    assert (await env.client(BOB).call("Email/query", {}))["ids"] == []
    # Recipients match the directory case-insensitively.
    ids = await env.backend.deliver(["BOB@Example.com"], message())
    assert list(ids) == [BOB]


async def test_using_must_name_core_for_echo(bob: Client) -> None:
    response = await bob.request([("Core/echo", {}, "e")], using=[MAIL])
    assert response.methodResponses[0][1]["type"] == "unknownMethod"


async def test_a_failing_method_is_rolled_back_and_the_request_goes_on(
        bob: Client, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.backend.store import AccountWriter

    def broken(self: AccountWriter, mailbox_id: str, values: dict[str, Any]) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(AccountWriter, "update_mailbox", broken)
    inbox = await bob.mailbox("inbox")
    state = await bob.state("Mailbox")
    response = await bob.request([
        ("Mailbox/set", {"accountId": bob.account_id, "create": {"n": {"name": "Half"}},
                         "update": {inbox: {"sortOrder": 9}}}, "s"),
        ("Mailbox/get", {"accountId": bob.account_id, "properties": ["name"]}, "g"),
        ("Mailbox/get", {"accountId": bob.account_id, "ids": ["#n"]}, "r"),
    ])
    (name, failed, _), (_, listing, _), (_, by_ref, _) = response.methodResponses
    assert by_ref["notFound"] == ["#n"]
    # RFC 8620 §3.6.2 serverFail; the create of the same call was rolled back with it.
    assert name == "error" and failed["type"] == "serverFail"
    assert "Half" not in [m["name"] for m in listing["list"]]
    assert listing["state"] == state and await bob.state("Mailbox") == state
    assert env.events == []
