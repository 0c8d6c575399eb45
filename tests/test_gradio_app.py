"""The web demo (`python -m llava.serve.gradio_app`): its functions, the running server through gradio_client,
and one end-to-end check in a real headless browser (Debian's chromium + chromedriver, installed here when
missing) that uploads an image, asks, and sees the answer and the kept-token panel; a screenshot is saved."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO_ROOT, subprocess_env
from PIL import Image

from llava.eval.run_llava import answer
from llava.model.builder import load_pretrained_model

gradio = pytest.importorskip("gradio")

from llava.serve.gradio_app import DemoModel, build_app, message_text, turns_of  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(pmod_checkpoint):
    tokenizer, model, image_processor, _ = load_pretrained_model(pmod_checkpoint)
    return DemoModel(tokenizer, model, image_processor, "vicuna_v1")


def test_streamed_reply_is_run_llavas_answer_and_turns_continue(demo, shapes_picture):
    image = Image.open(shapes_picture).convert("RGB")
    prompt = demo.prompt([("What color is the square?", None)], with_image=True)
    partial = list(demo.stream_reply(prompt, image, temperature=0.0, max_new_tokens=6))
    assert partial and partial[-1] == answer(demo.model, demo.tokenizer, demo.image_processor,
                                             "What color is the square?", [image], max_new_tokens=6)
    assert all(later.startswith(earlier) for earlier, later in zip(partial, partial[1:]))
    history = [{"role": "user", "content": "What color is the square?"}, {"role": "assistant", "content": "Red."},
               {"role": "user", "content": "Where is it?"}]
    turns = turns_of(history)
    assert turns == [("What color is the square?", "Red."), ("Where is it?", None)]
    second = demo.prompt(turns, with_image=True)
    assert second.count("<image>") == 1 and "ASSISTANT: Red.</s>USER: Where is it? ASSISTANT:" in second


def test_kept_token_panel_follows_the_schedule(demo, shapes_picture):
    image = Image.open(shapes_picture).convert("RGB")
    panel = demo.kept_tokens(demo.prompt([("What is it?", None)], True), image)
    assert panel.kept == demo.schedule.keep_counts(panel.vision_tokens)
    assert len(panel.overlays) == demo.model.config.num_hidden_layers
    assert panel.overlays[0].size == panel.overlays[-1].size and panel.overlays[0].width == 448
    dark = [sum(pixel < 80 for pixel in overlay.convert("L").tobytes()) for overlay in panel.overlays]
    assert dark[-1] > dark[0], "later layers skip more tokens, so more of the image is darkened"
    assert "TFLOPs" in panel.costs and "KV cache" in panel.costs and "dense" in panel.costs


def test_the_app_builds_with_its_api(demo):
    app = build_app(demo)
    assert "/chat" in app.get_api_info()["named_endpoints"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(pmod_checkpoint):
    """The app as a user starts it, on a free local port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llava.serve.gradio_app", "--model-path", pmod_checkpoint, "--port", str(port),
         "--device", "cpu"], cwd=REPO_ROOT, env=subprocess_env(GRADIO_ANALYTICS_ENABLED="False"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited:\n{process.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("the app did not answer within 3 minutes")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_the_running_server_answers_through_gradio_client(server, shapes_picture, demo):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    picture = handle_file(str(shapes_picture))
    history, question, costs, _, kept = client.predict("What color is the square?", picture, [],
                                                       0.0, 6, api_name="/chat")
    image = Image.open(shapes_picture).convert("RGB")
    expected = answer(demo.model, demo.tokenizer, demo.image_processor, "What color is the square?", [image],
                      max_new_tokens=6)
    assert history[-1]["role"] == "assistant" and message_text(history[-1]["content"]) == expected
    assert question == "" and "TFLOPs" in costs
    assert Image.open(kept["path"] if isinstance(kept, dict) else kept).width == 448
    history, *_ = client.predict("Where is it?", picture, history, 0.0, 6, api_name="/chat")
    assert [turn[0] for turn in turns_of(history)] == ["What color is the square?", "Where is it?"]
    assert message_text(history[-1]["content"]) == demo_answer(demo, image, turns_of(history))


def demo_answer(demo, image, turns):
    """The greedy reply to the conversation so far, computed in this process."""
    prompt = demo.prompt([*turns[:-1], (turns[-1][0], None)], with_image=True)
    return list(demo.stream_reply(prompt, image, 0.0, 6))[-1]


def chrome_driver(tmp_path):
    """A headless Debian chromium through selenium; installed with apt where missing, else the test skips."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if shutil.which("apt-get") is None:
            pytest.skip("chromium / chromedriver missing and no apt-get to install them")
        install = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver"
        result = subprocess.run(["bash", "-c", install], capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not shutil.which("chromedriver"):
            pytest.skip(f"could not install chromium + chromium-driver: {result.stderr[-500:]}")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def test_a_browser_uploads_asks_and_sees_the_answer_and_the_kept_tokens(server, shapes_picture, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome_driver(tmp_path)
    screenshot = tmp_path / "gradio_app.png"
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(shapes_picture))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What color is the square?")
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        kept = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#kept img")))
        wait.until(lambda d: "TFLOPs" in d.find_element(By.CSS_SELECTOR, "#costs").text)
        bot_messages = driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot, #chatbot [data-testid='bot']")
        assert bot_messages and bot_messages[-1].text.strip(), "the answer is shown"
        assert kept.get_attribute("src")
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    print(f"screenshot: {screenshot}")
    assert Image.open(screenshot).size[0] > 0
