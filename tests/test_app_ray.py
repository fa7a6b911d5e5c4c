"""The Compare page submits its study to Ray when UFM_RAY_ADDRESS is set, and shows it as before."""

from .ray_start import start_ray
from .test_app import _app, app_env  # noqa: F401 - the fixture is used by name

def test_compare_page_runs_its_study_on_ray(app_env, monkeypatch):  # noqa: F811
    ray = start_ray(2)  # fails in CI, skips elsewhere
    monkeypatch.setenv("UFM_RAY_ADDRESS", "auto")  # Ray is up in this process: the executor joins it
    from dashboard import state
    from ufm.runs.executors import RayExecutor

    state.executor.clear()
    try:
        at = _app().switch_page("app_pages/train.py").run()
        at.number_input(key="tr_epochs").set_value(2).run()
        at.number_input(key="tr_ood").set_value(40).run()
        at.switch_page("app_pages/compare.py").run()
        at.multiselect(key="cmp_regs").set_value(["none", "dropout"])
        at.number_input(key="cmp_seeds").set_value(1)
        at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
        assert not at.exception
        assert any(p.proto.text.endswith("of 2 runs finished") for p in at.get("progress"))  # as with the runner
        ex = state.executor()
        assert isinstance(ex, RayExecutor)
        ids = ex.active()
        assert len(ids) == 2 and state.runner().active() == []  # on Ray, not on the local runner
        assert [r.status for r in ex.wait(ids, timeout=240)] == ["done", "done"]
        at.run()
        assert not at.exception
        assert int(at.dataframe[0].value["done"].sum()) == 2  # results the Ray driver wrote to the store
        assert not any(p.proto.text.endswith("runs finished") for p in at.get("progress"))
    finally:
        state.executor().shutdown()
        state.executor.clear()
        ray.shutdown()
