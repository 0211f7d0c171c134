"""The test vectors of THB/1 §7 (docs/protocol.md), byte for byte, shared by the codec and protocol tests."""

from __future__ import annotations

#: Nonces and key of the vectors.
SERVER_NONCE = bytes(range(0x10))
CLIENT_NONCE = bytes(range(0x10, 0x20))
KEY = b"secret"
#: The PING's opaque bytes.
OPAQUE = bytes(range(8))

SERVER_HELLO = bytes.fromhex(
    "01 00 00 00 00 24 54 48 42 31 00 00 00 00 03 e8 00 00 0b b8 00 10 00 00"
    "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 00 00"
)
CLIENT_HELLO = bytes.fromhex(
    "01 00 00 00 00 4a 54 48 42 31 01 00 00 00 01 f4 00 00 05 dc 00 01 00 00"
    "10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 06 6e 6f 64 65 2d 31 20"
    "9c 33 6e 76 c7 3b f2 d9 c7 82 17 14 0a 66 b0 c6 1d d1 5c bb c7 a1 26 08"
    "2c 60 30 c2 67 ac 70 52"
)
PING = bytes.fromhex("03 00 00 00 00 09 00 01 02 03 04 05 06 07 00")
PONG = bytes.fromhex("04 00 00 00 00 09 00 01 02 03 04 05 06 07 02")
DATA_HI = bytes.fromhex("02 00 00 00 00 02 68 69")
CLOSE_1011 = bytes.fromhex(
    "05 00 00 00 00 13 03 f3 68 65 61 72 74 62 65 61 74 20 74 69 6d 65 6f 75 74"
)
