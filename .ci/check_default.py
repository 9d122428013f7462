"""The README's claim about the embedded default, checked on the run CI just made."""

import json
import sys

methods = json.load(open(sys.argv[1]))["methods"]
acc = {name: methods[name]["final_acc"] for name in ("zero_shot", "seq_ft", "magmax", "average")}
bwt = {name: methods[name]["bwt"] for name in ("seq_ft", "magmax", "average")}
print(f"default run: final ACC {acc}, BWT {bwt}")
assert acc["magmax"] > acc["seq_ft"] + 3 and acc["average"] > acc["seq_ft"], "merging no longer beats Seq-FT"
assert bwt["seq_ft"] < bwt["magmax"] - 3, "Seq-FT no longer forgets more than MagMax"
