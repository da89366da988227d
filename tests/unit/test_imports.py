import subprocess
import sys


def test_proxy_imports_without_torch_or_vllm():
    """The proxy's image has neither; importing them must never be needed."""
    code = (
        "import sys\n"
        "for name in ('torch', 'vllm', 'zmq', 'transformers', 'numpy'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import proxy, proxy.front.app, proxy.serve.flow, proxy.cli\n"
        "from proxy.settings import Settings\n"
        "proxy.front.app.create_app(Settings(prefill_urls=['http://a:1'], decode_urls=['http://b:2']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
