"""The demo checkpoint maker, kept here for ``python -m examples.models.cogvlm2_llama3_video.make_demo DIR``;
it lives in ``atb_llm.demo.make_demo``."""
from atb_llm.demo.make_demo import (  # noqa: F401 - re-exported
    DEMO_VERSION,
    default_cache_dir,
    ensure_demo,
    main,
    make_demo_checkpoint,
    tokenizer_dir,
)

if __name__ == "__main__":
    main()
