"""A model audit as a self-contained HTML page (``ufm audit --html``, the dashboard's download)."""

from __future__ import annotations

from ufm.audits.model_audit import ModelAuditResult


def model_audit_html(result: ModelAuditResult, audit_id: str | None = None) -> str:
    """A self-contained HTML report: verdict, numbers, d_u vs d_r histogram, access gains, settings."""
    from ufm.reports.html_page import esc, figure_html, fmt, kv_table, page, table
    from ufm.reports.plots import histogram_figure

    s = result.summary()
    spec = result.input_spec
    title = f"ufm audit of {result.model_name}" + (f" ({audit_id})" if audit_id else "")
    acc = result.access
    gains = [(name, g.label, g.gain, g.p_value, g.p_value_paper, g.n) for name, g in
             (("white-box (label known)", acc.white_box), ("grey-box (max over classes)", acc.grey_box),
              ("black-box (max over classes, inference images)", acc.black_box_gain)) if g is not None]
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="verdict"><b>{esc(result.verdict.headline)}.</b> {esc(result.verdict.text)}</p>',
            f'<p class="note">{esc(result.verdict.calibration or "")}</p>',
            "<h2>Memorisation</h2>",
            kv_table([("M = X_u - X_r (nats)", s["M"]), ("X_u (nats)", s["X_u"]), ("X_r (nats)", s["X_r"]),
                      ("exposure p (fast test)", s["exposure_p_value"]), ("exposure (bits)", s["exposure"]),
                      ("candidate family", s["family"]), ("candidates K", s["candidates"]),
                      ("t-test p (Welch, one-tailed; the paper's statistic, not the verdict)", s["p_value"]),
                      ("paired t-test p (the paper's statistic)", s["p_value_paired"]),
                      ("inference images", s["n_ood"]), ("test accuracy on labelled images",
                                                         None if s["test_accuracy"] is None else s["test_accuracy"])]),
            figure_html(histogram_figure(result.score.d_u, result.score.d_r), "fig-hist", 420),
            "<h2>Confidence gain (access settings)</h2>",
            table(["setting", "class", "gain", "calibrated p", "paper's t-test p", "images"], gains),
            "<h2>Model</h2>",
            kv_table([("file", result.model_name), ("sha256", result.model_sha256),
                      ("input", f"{spec['layout']} {spec['channels']}x{spec['height']}x{spec['width']}"),
                      ("normalisation", f"mean {spec['mean']}, std {spec['std']}" if spec["mean"] else "none"),
                      ("outputs", result.output_kind), ("classes", result.num_classes)]),
            "<h2>Settings</h2>",
            kv_table([(k, fmt(v)) for k, v in result.config.to_dict().items() if k != "feature"]
                     + [("feature", f"{result.config.feature.name} {result.config.feature.size} at "
                                    f"{result.config.feature.offset}")])]
    return page(title, body)
