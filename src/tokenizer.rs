//! Placeholder until the GGUF tokenizer lands (replaced by the data branch).
use candle_core::quantized::gguf_file;
pub fn tokenizer_from_gguf(_content: &gguf_file::Content) -> crate::Result<tokenizers::Tokenizer> {
    Err(crate::Error::Tokenizer("GGUF tokenizer not available".into()))
}
pub fn chat_template_from_gguf(content: &gguf_file::Content) -> Option<String> {
    content.metadata.get("tokenizer.chat_template")?.to_string().ok().cloned()
}
