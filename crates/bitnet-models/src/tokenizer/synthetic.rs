//! A deterministic synthetic tokenizer: byte-level BPE with the LLaMA-3
//! pre-tokenizer, trained by a small deterministic trainer on a built-in corpus.
//!
//! Layout of `synthetic(n)`: ids 0-255 are the 256 byte tokens in byte order
//! (so any text encodes), then the learned tokens in the order the trainer
//! created them, then [`SYNTHETIC_SPECIAL_TOKENS`] (BOS, EOS, EOT, header
//! start/end), then `<|reserved_special_token_K|>` (K = 0, 1, ...) up to
//! exactly `n` tokens. The specials and reserved tokens are control tokens,
//! as in LLaMA-3. Training stops when no pair occurs twice, so large `n` get
//! many reserved tokens.
//!
//! The trainer is ours rather than `tokenizers`' `BpeTrainer` so that the
//! result depends on nothing but this file: each step merges the most
//! frequent adjacent pair (counted over distinct pre-tokenized words, weighted
//! by frequency), ties going to the smallest (left id, right id). Because the
//! run for a small vocabulary is a prefix of the run for a large one, the full
//! run is computed once and cut.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use super::{
    bytes_to_token, pre_tokenizer, PreTokenizerKind, TokenType, Tokenizer, TokenizerError, Vocabulary,
    BITNET_CHAT_TEMPLATE,
};

/// BOS, EOS, EOT and the LLaMA-3 header markers, in id order after the learned tokens.
pub const SYNTHETIC_SPECIAL_TOKENS: [&str; 5] =
    ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"];

/// The smallest vocabulary `synthetic` accepts: the 256 bytes and the 5 specials.
pub const SYNTHETIC_MIN_VOCAB_SIZE: usize = 256 + SYNTHETIC_SPECIAL_TOKENS.len();

impl Tokenizer {
    /// The deterministic synthetic tokenizer with exactly `vocab_size` tokens
    /// (see the module docs). Errors if `vocab_size` is below
    /// [`SYNTHETIC_MIN_VOCAB_SIZE`].
    pub fn synthetic(vocab_size: usize) -> Result<Self, TokenizerError> {
        if vocab_size < SYNTHETIC_MIN_VOCAB_SIZE {
            return Err(TokenizerError::VocabTooSmall { requested: vocab_size, minimum: SYNTHETIC_MIN_VOCAB_SIZE });
        }
        let trained = TRAINED.as_ref().map_err(|message| TokenizerError::Library {
            context: "training the synthetic BPE",
            message: message.clone(),
        })?;
        let (learned, merges) = trained.prefix(vocab_size - SYNTHETIC_MIN_VOCAB_SIZE);

        let mut tokens: Vec<String> = (0..=255u8).map(|b| bytes_to_token(&[b])).collect();
        tokens.extend_from_slice(learned);
        let n_normal = tokens.len();
        tokens.extend(SYNTHETIC_SPECIAL_TOKENS.iter().map(|s| (*s).to_owned()));
        let n_reserved = vocab_size - tokens.len();
        tokens.extend((0..n_reserved).map(|k| format!("<|reserved_special_token_{k}|>")));

        let mut token_types = vec![TokenType::Normal; n_normal];
        token_types.resize(vocab_size, TokenType::Control);
        let special_id = |offset: usize| u32::try_from(n_normal + offset).ok();
        let vocab = Vocabulary {
            tokens,
            token_types,
            merges: merges.to_vec(),
            pre_tokenizer: PreTokenizerKind::Llama3,
            ignore_merges: PreTokenizerKind::Llama3.default_ignore_merges(),
            bos_id: special_id(0),
            eos_id: special_id(1),
            eot_id: special_id(2),
            add_bos: true,
            chat_template: Some(BITNET_CHAT_TEMPLATE.to_owned()),
        };
        Self::from_vocabulary(vocab)
    }
}

/// The result of training to exhaustion on [`CORPUS`].
#[derive(Debug)]
struct TrainedBpe {
    /// New tokens in creation order.
    learned: Vec<String>,
    merges: Vec<(String, String)>,
    /// `learned_after[i]`: number of new tokens once merge `i` is applied
    /// (a merge whose result already exists adds none).
    learned_after: Vec<usize>,
}

impl TrainedBpe {
    /// The run that stops as soon as it has `max_learned` new tokens.
    fn prefix(&self, max_learned: usize) -> (&[String], &[(String, String)]) {
        let n_learned = max_learned.min(self.learned.len());
        let n_merges = if n_learned == self.learned.len() {
            self.merges.len()
        } else {
            // The merge that created token number `n_learned` is the last one kept.
            self.learned_after.partition_point(|&n| n < n_learned) + usize::from(n_learned > 0)
        };
        (&self.learned[..n_learned], &self.merges[..n_merges])
    }
}

static TRAINED: LazyLock<Result<TrainedBpe, String>> = LazyLock::new(|| train(CORPUS).map_err(|e| e.to_string()));

/// Trains byte-level BPE on `corpus` until no adjacent pair occurs twice.
fn train(corpus: &str) -> Result<TrainedBpe, TokenizerError> {
    let word_counts = pre_tokenized_word_counts(corpus)?;

    // Symbols are token ids; ids 0-255 are the byte tokens.
    let mut token_strings: Vec<String> = (0..=255u8).map(|b| bytes_to_token(&[b])).collect();
    let mut ids: HashMap<String, u32> = token_strings.iter().cloned().zip(0u32..).collect();
    let mut words: Vec<(Vec<u32>, u64)> = Vec::with_capacity(word_counts.len());
    for (word, count) in word_counts {
        let symbols =
            word.chars().map(|c| ids.get(c.to_string().as_str()).copied()).collect::<Option<Vec<u32>>>().ok_or_else(
                || TokenizerError::Library {
                    context: "training the synthetic BPE",
                    message: format!("pre-tokenized word `{word}` is not in byte-level form"),
                },
            )?;
        words.push((symbols, count));
    }

    let mut trained = TrainedBpe { learned: Vec::new(), merges: Vec::new(), learned_after: Vec::new() };
    loop {
        let mut pair_counts: HashMap<(u32, u32), u64> = HashMap::new();
        for (symbols, count) in &words {
            for pair in symbols.windows(2) {
                *pair_counts.entry((pair[0], pair[1])).or_default() += count;
            }
        }
        // Highest count first; among equal counts the smallest pair, so the
        // choice never depends on hash order.
        let best = pair_counts
            .into_iter()
            .max_by(|(pair_a, count_a), (pair_b, count_b)| count_a.cmp(count_b).then(pair_b.cmp(pair_a)));
        let Some(((left, right), count)) = best else { break };
        if count < 2 {
            break;
        }

        let left_text = &token_strings[left as usize];
        let right_text = &token_strings[right as usize];
        let merged_text = format!("{left_text}{right_text}");
        trained.merges.push((left_text.clone(), right_text.clone()));
        let merged = match ids.get(&merged_text) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(token_strings.len())
                    .map_err(|_| TokenizerError::VocabularyTooLarge { n_tokens: token_strings.len() })?;
                ids.insert(merged_text.clone(), id);
                token_strings.push(merged_text.clone());
                trained.learned.push(merged_text);
                id
            }
        };
        trained.learned_after.push(trained.learned.len());
        for (symbols, _) in &mut words {
            merge_pair(symbols, (left, right), merged);
        }
    }
    Ok(trained)
}

/// Replaces the non-overlapping occurrences of `pair`, left to right.
fn merge_pair(symbols: &mut Vec<u32>, pair: (u32, u32), merged: u32) {
    let mut out = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
            out.push(merged);
            i += 2;
        } else {
            out.push(symbols[i]);
            i += 1;
        }
    }
    *symbols = out;
}

/// Splits `corpus` with the LLaMA-3 pre-tokenizer (byte-level spelling) and
/// counts each word, in a deterministic (sorted) map.
fn pre_tokenized_word_counts(corpus: &str) -> Result<BTreeMap<String, u64>, TokenizerError> {
    let pre = pre_tokenizer(PreTokenizerKind::Llama3)?;
    let mut pieces = PreTokenizedString::from(corpus);
    pre.pre_tokenize(&mut pieces).map_err(|e| TokenizerError::library("pre-tokenizing the synthetic corpus", e))?;
    let mut counts = BTreeMap::new();
    for (word, _, _) in pieces.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(word.to_owned()).or_insert(0u64) += 1;
    }
    Ok(counts)
}

/// The training corpus: invented English prose, numbers and code-like text,
/// written for this crate.
const CORPUS: &str = r#"The little robot walked to the market on Tuesday morning. It wanted to buy seven green apples and a loaf of bread.
At the market, the baker said: "We have fresh bread today, and the price is 3 coins for one loaf."
The robot counted its coins: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. It had enough money for bread and apples.
"Thank you," said the robot. "I will come back next week." The baker smiled and waved goodbye.
On the way home, the robot met a cat sitting on a wall. The cat was orange and white, and it was very sleepy.
"Hello, cat," said the robot. The cat opened one eye, looked at the robot, and went back to sleep.
In the evening the robot made soup with the apples. It was not a good soup, but the robot was happy anyway.

Numbers are everywhere. There are 365 days in a year, 24 hours in a day, and 60 minutes in an hour.
The year 2024 had 366 days. A kilometre is 1000 metres, and a metre is 100 centimetres.
If you multiply 12 by 12 you get 144. If you add 256 and 512 you get 768. Half of 1024 is 512.
The temperature was 21.5 degrees at noon and 14.25 degrees at midnight. The river is 3.7 km long.
Call 555-0199 between 9:00 and 17:30, or write to the office at 42 Lantern Street, Room 808.
Version 1.2.3 was released on 2023-11-05; version 2.0.0 followed on 2024-06-18 with 1,250 changes.
Prices: tea 2.50, coffee 3.75, cake 4.20, soup 6.00. Total for the table: 16.45 and a tip of 10%.

We're sure it's fine, they'll say, and you've seen it; I'm not sure we'd agree. Don't worry, it'd work.
What is the capital of the small island? Nobody knows, because the island has no cities at all.
Why do birds sing in the morning? Some say they sing to greet the sun; others say they sing to find friends.
How many stars are in the sky? More than anyone can count, even with a very large telescope.
She opened the window and the cold air came in. He closed the door, and the room was quiet again.
They planted twenty trees along the road, and every spring the trees were covered with white flowers.
The teacher wrote three words on the board: learn, share, and build. The students copied them slowly.
A good plan today is better than a perfect plan tomorrow, the old captain liked to say to his crew.
The train leaves at eight o'clock and arrives at the coast just before lunch, if the weather is kind.

fn main() {
    let numbers = vec![1, 2, 3, 4, 5];
    let total: i32 = numbers.iter().sum();
    println!("total = {}", total);
    for (index, value) in numbers.iter().enumerate() {
        if value % 2 == 0 {
            println!("{} is even at index {}", value, index);
        }
    }
}

def count_words(text):
    counts = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts

class Garden:
    def __init__(self, name, size=10):
        self.name = name
        self.size = size
        self.plants = []

    def add(self, plant):
        if len(self.plants) < self.size:
            self.plants.append(plant)
            return True
        return False

for i in range(0, 100, 5):
    print(f"step {i}: value={i * i}")

SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC LIMIT 5;
{"id": 17, "name": "lamp", "tags": ["light", "home"], "price": 29.99, "in_stock": true}
<div class="note">Remember to water the plants on Monday and Thursday.</div>
x = (a + b) * c - d / 2; y = x ** 2 + 3 * x + 1; z = [x, y, x + y];
if (count >= 100 && ready) { return total / count; } else { return -1; }

The library opened a new room for children, with low shelves, soft chairs and a big map of the world.
Every Saturday a storyteller visited the room and told tales about dragons, ships and clever foxes.
One story was about a fox who learned to count. The fox counted the stones: one, two, three, four, five.
Another story was about a ship that sailed to the edge of the map and found a new island full of music.
The children asked many questions. Where does the wind come from? Why is the sea salty? Can fish sleep?
The storyteller answered what she could, and for the rest she said: "Let us find out together next week."

Weather report: on Monday, sunny with 18 degrees; Tuesday, cloudy, 16 degrees; Wednesday, rain, 12 degrees.
Thursday brings wind from the north at 30 km/h, and Friday will be calm and warm, around 22 degrees.
The weekend looks dry. Farmers expect the harvest to start in 2 weeks, about 14 days from today.
Meeting notes: 1) review the budget; 2) plan the summer event; 3) choose a date; 4) send invitations.
The budget for the event is 4500, of which 1200 is for food, 800 for music and 2500 for the tent.
Questions: should the event start at 10 or at 11? Should we invite 150 guests or 200 guests?

Simple rules for writing clear text: use short sentences, choose common words, and give one idea per line.
Read your text aloud. If you run out of breath, the sentence is too long. If you stumble, rewrite it.
Good examples help more than long explanations. Show the reader what you mean, then explain why.
The end of a chapter is a good place to pause. The end of a book is a good place to start another one.
"#;
