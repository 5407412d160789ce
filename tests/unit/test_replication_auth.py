"""The shared-secret handshake of the replication link, both sides driven in memory."""

from __future__ import annotations

import pytest

from common.replication.auth import (
    CHALLENGE_BYTES,
    RESPONSE_BYTES,
    AuthFailed,
    ClientHandshake,
    ServerHandshake,
)

SECRET = b"0123456789abcdef-shared"


def test_the_same_secret_authenticates_both_ways_and_passes_later_bytes_on() -> None:
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    challenge = server.challenge()
    assert len(challenge) == CHALLENGE_BYTES
    response = client.respond(challenge)
    assert len(response) == RESPONSE_BYTES
    hello = b"\x00\x00\x00\x05hello"  # what follows the response on the wire
    stream = response + hello
    proof = None
    for i in range(len(stream)):  # a byte at a time: any split works
        proof = server.receive(stream[i : i + 1]) or proof
        if proof is not None:
            leftover = server.leftover + stream[i + 1 :]
            break
    assert proof is not None and leftover == hello
    client.check_proof(proof)  # no exception: the primary holds the secret too


def test_a_wrong_secret_fails_on_the_primary() -> None:
    server, client = ServerHandshake(SECRET), ClientHandshake(b"another-secret-of-16+")
    with pytest.raises(AuthFailed, match="wrong shared secret"):
        server.receive(client.respond(server.challenge()))


def test_a_primary_without_the_secret_fails_on_the_secondary() -> None:
    impostor, client = ServerHandshake(b"not-the-real-secret!"), ClientHandshake(SECRET)
    honest = ServerHandshake(SECRET)
    response = client.respond(honest.challenge())
    # The impostor cannot compute the proof; replaying another exchange's proof fails too.
    other = ClientHandshake(SECRET)
    replayed = honest.receive(response)
    assert replayed is not None
    with pytest.raises(AuthFailed, match="wrong shared secret"):
        other.respond(impostor.challenge())
        other.check_proof(replayed)


def test_a_response_reflected_back_is_not_a_proof() -> None:
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    response = client.respond(server.challenge())
    with pytest.raises(AuthFailed):
        client.check_proof(response[-32:])  # the client's own MAC is not the server's


def test_a_secondary_without_a_secret_sends_hello_and_is_told_apart() -> None:
    server = ServerHandshake(SECRET)
    with pytest.raises(AuthFailed, match="no authentication response"):
        server.receive(b"\x00\x00\x01\x00")  # a frame length: a Hello, not "JPAU"


def test_a_primary_without_a_secret_sends_no_challenge() -> None:
    with pytest.raises(AuthFailed, match="no authentication challenge"):
        ClientHandshake(SECRET).respond(b"\x00" * CHALLENGE_BYTES)
