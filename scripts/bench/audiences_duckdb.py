"""The ten audiences of bench-audiences computed with SQL by DuckDB over the
same customers and events, exported to Parquet: prints each audience's size
and the time of the ten queries (Parquet scans included, conversion from CSV
not), and fails when a size differs from Tandem's (sizes.json)."""

import json
import sys
import time
from pathlib import Path

import duckdb

NOW = 1_780_272_000_000  # bench-audiences' NOW_MS, 2026-06-01T00:00:00Z
DAY = 86_400_000

# (name, SQL) in bench-audiences' order; windows: an event is within Nd while
# now < ts + N days, that is ts > now - N days.
AUDIENCES = [
    ("pro plan", "SELECT count(*) FROM profiles WHERE plan = 'pro'"),
    ("frequent big orders", f"""
        SELECT count(*) FROM (
          SELECT profile_id FROM events
          WHERE event = 'Order Completed' AND total > 50 AND ts > {NOW - 30 * DAY}
          GROUP BY profile_id HAVING count(*) >= 3)"""),
    ("browsing, no tickets", f"""
        SELECT count(*) FROM (
          SELECT profile_id FROM events
          WHERE ts > {NOW - 30 * DAY} AND event IN ('Product Viewed', 'Ticket Opened')
          GROUP BY profile_id
          HAVING bool_or(event = 'Product Viewed')
             AND NOT bool_or(event = 'Ticket Opened' AND ts > {NOW - 7 * DAY}))"""),
    ("shoes then order", f"""
        SELECT count(*) FROM (
          SELECT profile_id,
                 min(ts) FILTER (WHERE event = 'Product Viewed' AND category = 'shoes') AS viewed,
                 max(ts) FILTER (WHERE event = 'Order Completed') AS ordered
          FROM events WHERE ts > {NOW - 7 * DAY} AND event IN ('Product Viewed', 'Order Completed')
          GROUP BY profile_id)
        WHERE ordered > viewed"""),
    ("active in Germany", f"""
        SELECT count(*) FROM profiles JOIN (
          SELECT profile_id FROM events
          WHERE event = 'Page Viewed' AND ts > {NOW - 14 * DAY}
          GROUP BY profile_id HAVING count(*) >= 5) USING (profile_id)
        WHERE country = 'DE'"""),
    ("30 to 44, ordered", f"""
        SELECT count(*) FROM profiles
        WHERE age >= 30 AND age < 45 AND profile_id IN (
          SELECT profile_id FROM events WHERE event = 'Order Completed' AND ts > {NOW - 90 * DAY})"""),
    ("loyal or troubled", f"""
        SELECT count(*) FROM (
          SELECT profile_id FROM events WHERE event IN ('Order Completed', 'Ticket Opened')
          GROUP BY profile_id
          HAVING count(*) FILTER (WHERE event = 'Order Completed') >= 5
              OR count(*) FILTER (WHERE event = 'Ticket Opened' AND ts > {NOW - 30 * DAY}) >= 2)"""),
    ("abandoned checkout", f"""
        SELECT count(*) FROM (
          SELECT profile_id FROM events
          WHERE ts > {NOW - 3 * DAY} AND event IN ('Checkout Started', 'Order Completed')
          GROUP BY profile_id
          HAVING bool_or(event = 'Checkout Started') AND NOT bool_or(event = 'Order Completed'))"""),
    ("fast funnel", f"""
        WITH recent AS (
          SELECT profile_id, event, ts FROM events
          WHERE ts > {NOW - 3 * DAY} AND event IN ('Page Viewed', 'Product Viewed', 'Checkout Started')),
        first_page AS (
          SELECT profile_id, min(ts) AS at FROM recent WHERE event = 'Page Viewed' GROUP BY profile_id),
        then_product AS (
          SELECT recent.profile_id, min(recent.ts) AS at FROM recent JOIN first_page USING (profile_id)
          WHERE recent.event = 'Product Viewed' AND recent.ts > first_page.at GROUP BY recent.profile_id),
        last_checkout AS (
          SELECT profile_id, max(ts) AS at FROM recent WHERE event = 'Checkout Started' GROUP BY profile_id)
        SELECT count(*) FROM then_product JOIN last_checkout USING (profile_id)
        WHERE last_checkout.at > then_product.at"""),
    ("free and gone quiet", f"""
        SELECT count(*) FROM profiles
        WHERE plan = 'free' AND profile_id NOT IN (
          SELECT profile_id FROM events WHERE event = 'Page Viewed' AND ts > {NOW - 60 * DAY})"""),
]


def main() -> int:
    directory = Path(sys.argv[1])
    tandem = json.loads((directory / "sizes.json").read_text())
    db = duckdb.connect()
    started = time.perf_counter()
    db.execute(f"""COPY (SELECT * FROM read_csv('{directory / "profiles.csv"}', header = true, nullstr = '',
                   columns = {{'profile_id': 'BIGINT', 'plan': 'VARCHAR', 'country': 'VARCHAR', 'age': 'INTEGER'}}))
                   TO '{directory / "profiles.parquet"}' (FORMAT parquet)""")
    db.execute(f"""COPY (SELECT * FROM read_csv('{directory / "events.csv"}', header = true, nullstr = '',
                   columns = {{'profile_id': 'BIGINT', 'event': 'VARCHAR', 'ts': 'BIGINT',
                              'total': 'DOUBLE', 'category': 'VARCHAR'}}))
                   TO '{directory / "events.parquet"}' (FORMAT parquet)""")
    print(f"duckdb {duckdb.__version__}: csv to parquet in {time.perf_counter() - started:.1f} s (not counted)")
    db.execute(f"CREATE VIEW profiles AS SELECT * FROM read_parquet('{directory / 'profiles.parquet'}')")
    db.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{directory / 'events.parquet'}')")
    threads = db.execute("SELECT current_setting('threads')").fetchone()[0]
    total = 0.0
    mismatches = []
    for name, sql in AUDIENCES:
        started = time.perf_counter()
        size = db.execute(sql).fetchone()[0]
        elapsed = time.perf_counter() - started
        total += elapsed
        expected = tandem["sizes"][name]
        mark = "" if size == expected else f"   <- tandem says {expected}"
        if size != expected:
            mismatches.append(name)
        print(f"  {name:<22} {size:>9}  {elapsed * 1000:8.0f} ms{mark}")
    print(f"duckdb queries:        {total:.2f} s for {len(AUDIENCES)} audiences on {threads} threads")
    print(f"tandem evaluation:     {tandem['seconds']:.2f} s (tandem / duckdb = {tandem['seconds'] / total:.2f})")
    if mismatches:
        print(f"sizes differ for: {', '.join(mismatches)}", file=sys.stderr)
        return 1
    print("sizes agree for all audiences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
