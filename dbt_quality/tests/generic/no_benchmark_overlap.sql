{#
  no_benchmark_overlap: fails on every row whose text shares a normalised word n-gram with a benchmark item of
  `benchmark_ngrams`, as the pipeline normalises (stages/decontamination.py): lower case, each character of var
  benchmark_separators a word boundary, n = var benchmark_ngram. Joined on the n-gram's text, not the pipeline's
  hash (Polars', which SQL cannot compute), so this is an independent check of what the pairs step removed.
#}
{% test no_benchmark_overlap(model, column_name) %}
with words as (
    select {{ column_name }} as text,
           list_filter(string_split(regexp_replace(lower({{ column_name }}), '{{ var("benchmark_separators") }}',
                                                   ' ', 'g'), ' '), lambda w: w <> '') as w
    from {{ model }}
),
grams as (
    select text, unnest(list_transform(range(1, len(w) - {{ var("benchmark_ngram") }} + 2),
                                       lambda i: array_to_string(w[i:i + {{ var("benchmark_ngram") }} - 1], ' '))) as ngram
    from words
    where len(w) >= {{ var("benchmark_ngram") }}
)
select distinct g.text, b.benchmark, b.item_id, b.ngram
from grams g
join {{ source('pipeline', 'benchmark_ngrams') }} b on b.ngram = g.ngram
{% endtest %}
