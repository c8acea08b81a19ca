{#
  within_document_budgets: fails on every document whose kept pairs exceed the budgets they were selected under
  (selected_max_pairs_per_document pairs; selected_max_pair_token_ratio x the document's tokens, counted with the
  export tokenizer; 0: no cap): the pairs step keeps a document's best pairs within both.
#}
{% test within_document_budgets(model) %}
select doc_id, count(*) as pairs, sum(pair_tokens) as pair_tokens, max(document_tokens) as document_tokens
from {{ model }}
group by doc_id
having (max(selected_max_pairs_per_document) > 0 and count(*) > max(selected_max_pairs_per_document))
    or (max(selected_max_pair_token_ratio) > 0
        and sum(pair_tokens) > max(selected_max_pair_token_ratio) * max(document_tokens))
{% endtest %}
