{#
  within_template_share_per_shard: fails on every (shard, template) whose kept pairs exceed the share of the shard's
  pairs they were selected under (selected_max_template_share_per_shard; 0: no cap), where a template may always
  keep one pair: the pairs step keeps each template's best pairs within it.
#}
{% test within_template_share_per_shard(model) %}
with per_template as (
    select shard, template_id, count(*) as pairs, max(selected_max_template_share_per_shard) as max_share
    from {{ model }}
    group by shard, template_id
), per_shard as (
    select shard, count(*) as shard_pairs from {{ model }} group by shard
)
select t.shard, t.template_id, t.pairs, s.shard_pairs, t.max_share
from per_template t join per_shard s on t.shard = s.shard
where t.max_share > 0 and t.pairs > greatest(1, t.max_share * s.shard_pairs)
{% endtest %}
