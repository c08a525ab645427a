"""The HTML page of the checks of ``hf_trak.check``: the LDS with its interval and the counterfactual table."""

from typing import Optional

import jinja2

from hf_trak.check.counterfactual import CounterfactualCheck
from hf_trak.check.lds_check import LDSCheck
from hf_trak.store.files import write_text

CHECK_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Attribution check</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 60em; }
td, th { padding: 0.2em 0.8em; text-align: right; } th:first-child, td:first-child { text-align: left; }
</style></head><body>
<h1>Attribution check</h1>
{% if lds %}<h2>Linear datamodeling score</h2>
<p>The model was trained again on {{ lds.num_subsets }} random subsets of {{ "%.0f"|format(100 * lds.fraction) }}%
of its train split with its own training arguments. The LDS is the Spearman correlation, over those models, of
the outputs the scores predict and the outputs the models give, averaged over the targets (1: perfect, 0: no
better than chance); the intervals are 95% bootstrap intervals over targets.</p>
<table><tr><th>scores</th><th>LDS</th><th>95% interval</th></tr>
<tr><td>these attributions</td><td>{{ "%.3f"|format(lds.lds) }}</td>
<td>{{ "%.3f"|format(lds.interval[0]) }} to {{ "%.3f"|format(lds.interval[1]) }}</td></tr>
<tr><td>random scores</td><td>{{ "%.3f"|format(lds.random_lds) }}</td>
<td>{{ "%.3f"|format(lds.random_interval[0]) }} to {{ "%.3f"|format(lds.random_interval[1]) }}</td></tr>
</table>{% endif %}
{% if counterfactual %}<h2>Counterfactual check</h2>
<p>For each target, the model was trained again without its top-{{ counterfactual.k }} proponents, and without
{{ counterfactual.k }} random training examples ({{ counterfactual.num_seeds }} seed(s), means). The change of the
model's output on the target is measured against the model trained on everything with the same seed; removing
the proponents should lower it far more than removing random examples.</p>
<table><tr><th>target</th><th>output, all data</th><th>change without the proponents</th>
<th>change without random examples</th></tr>
{% for target, full, top, random in counterfactual.rows() %}<tr><td>{{ target }}</td>
<td>{{ "%+.3f"|format(full) }}</td><td>{{ "%+.3f"|format(top) }}</td>
<td>{{ "%+.3f"|format(random) }}</td></tr>{% endfor %}
</table>{% endif %}
</body></html>
"""


def write_check_report(
    path: str, lds: Optional[LDSCheck] = None, counterfactual: Optional[CounterfactualCheck] = None
) -> str:
    """An HTML page of either check or both; returns its path."""
    page = jinja2.Environment(autoescape=True).from_string(CHECK_TEMPLATE)
    return write_text(path, page.render(lds=lds, counterfactual=counterfactual))
