"""Weight formats: one module per format, each an explicit name-mapping table onto the gptjax tree."""
