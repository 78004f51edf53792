//! Finding the PEM blocks in a text (RFC 7468): a bundle of keys in one environment variable, or
//! one key after the `EC PARAMETERS` block that `openssl ecparam -genkey` writes before it.

/// One `-----BEGIN <label>-----` ... `-----END <label>-----` block.
#[derive(Clone, Copy)]
pub(super) struct Block<'a> {
    /// The label, as in `PRIVATE KEY`.
    pub(super) label: &'a str,
    /// The block from the start of its BEGIN line to the end of its END line.
    pub(super) text: &'a str,
}

/// The label of the block `openssl ecparam -genkey` puts before the key; it repeats what the key
/// says about its curve, so it is skipped.
pub(super) const EC_PARAMETERS: &str = "EC PARAMETERS";

/// Why a text is not a sequence of PEM blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockError {
    /// A BEGIN line without its END line.
    Unterminated,
    /// A BEGIN line inside a block.
    Nested,
}

/// The PEM blocks of `text`, in order. Text between blocks is ignored (RFC 7468 allows
/// explanatory text there).
pub(super) fn blocks(text: &str) -> Result<Vec<Block<'_>>, BlockError> {
    let mut found = Vec::new();
    // (label, byte offset of the BEGIN line) of the block being read.
    let mut open: Option<(&str, usize)> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim();
        if let Some(label) = boundary(trimmed, "-----BEGIN ") {
            if open.is_some() {
                return Err(BlockError::Nested);
            }
            open = Some((label, start + (line.len() - line.trim_start().len())));
        } else if let Some(label) = boundary(trimmed, "-----END ")
            && let Some((open_label, begin)) = open
            && open_label == label
        {
            // An END line of another label is left alone; the block then ends unterminated.
            let end = start + (line.len() - line.trim_start().len()) + trimmed.len();
            found.push(Block {
                label,
                text: &text[begin..end],
            });
            open = None;
        }
    }
    match open {
        Some(_) => Err(BlockError::Unterminated),
        None => Ok(found),
    }
}

/// The label of an encapsulation boundary line (`-----BEGIN X-----` with `prefix` `-----BEGIN `).
fn boundary<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix)?.strip_suffix("-----")
}
