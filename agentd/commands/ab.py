"""agentd ab A B --html OUT | agentd ab --votes VOTES.json: a blind A/B test of two runs by people.

`agentd ab A B --html out.html` writes one self-contained page (`trainer.api.write_ab_page`) that shows, per
prompt and seed of both runs' evaluation images, the two images in random left/right order without names;
a person picks left / right / tie by click or key, and the page tallies, reveals the names and downloads
the votes as JSON. `agentd ab --votes votes.json` prints A's win rate (ties left out) and the two-sided sign
test. Exit 2 when a run has no evaluation images or the votes file is not one. Imports no torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(name: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentd ab", description="Blind A/B test of two runs' evaluation images.")
    p.add_argument("runs", nargs="*", metavar="RUN", help="two run folders (A B) with eval/ images")
    p.add_argument("--html", metavar="OUT", help="write the blind A/B page here")
    p.add_argument("--votes", metavar="VOTES", help="summarise a votes file the page downloaded")
    p.add_argument("--seed", type=int, default=0, help="draws the left/right order (default 0)")
    args = p.parse_args(argv)
    from trainer.api import votes_summary, write_ab_page

    if args.votes:
        try:
            s = votes_summary(Path(args.votes))
        except ValueError as e:
            print(f"agentd ab: {e}", file=sys.stderr)
            return 2
        rate = "n/a (no decided votes)" if s["a_win_rate"] is None else f"{s['a_win_rate']:.1%}"
        print(f"A: {s['a']}\nB: {s['b']}\nA wins {s['a_wins']}, B wins {s['b_wins']}, ties {s['ties']}\n"
              f"A's win rate (ties left out): {rate}\nsign test (two-sided): p = {s['sign_test_p']:.4g}")
        return 0
    if len(args.runs) != 2 or not args.html:
        p.error("give two run folders and --html OUT (or --votes VOTES.json)")
    out, problems = write_ab_page(Path(args.runs[0]).resolve(), Path(args.runs[1]).resolve(), Path(args.html),
                                  args.seed)
    if problems:
        for pr in problems:
            print(f"agentd ab: {pr.render('A/B')}", file=sys.stderr)
        return 2
    print(f"wrote {out}: open it in a browser, vote, then download the votes and run agentd ab --votes FILE")
    return 0
