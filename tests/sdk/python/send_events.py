"""Sends one of each Segment call to Tandem with Segment's official Python SDK,
unchanged but for its host. Exits non-zero if the SDK reports any error.

usage: send_events.py HOST WRITE_KEY TAG
"""

import sys

from segment.analytics import Client

host, write_key, tag = sys.argv[1:4]
errors = []
client = Client(
    write_key=write_key,
    host=host,
    gzip=True,
    max_retries=2,
    on_error=lambda error, batch: errors.append(repr(error)),
)
user, anonymous = f"{tag}-user", f"{tag}-anon"
client.identify(user_id=user, traits={"email": f"{tag}@example.com", "plan": "pro"}, message_id=f"{tag}-identify")
client.track(
    user_id=user,
    event="Order Completed",
    properties={"revenue": 42.5, "currency": "EUR", "items": [{"sku": "A-1", "qty": 2}]},
    context={"campaign": {"source": "newsletter"}},
    message_id=f"{tag}-track",
)
client.page(
    anonymous_id=anonymous,
    category="Docs",
    name="Pricing",
    properties={"url": "https://shop.example/pricing"},
    message_id=f"{tag}-page",
)
client.screen(user_id=user, name="Home", properties={"variant": "b"}, message_id=f"{tag}-screen")
client.group(user_id=user, group_id=f"{tag}-acme", traits={"employees": 50}, message_id=f"{tag}-group")
client.alias(previous_id=anonymous, user_id=user, message_id=f"{tag}-alias")
client.shutdown()
if errors:
    print("the SDK reported errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
print("sent 6 calls")
