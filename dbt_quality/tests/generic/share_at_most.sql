{#
  share_at_most: fails on every value of the column that accounts for more than max_share of the model's
  rows (one failing row per such value, with its count and share). With fewer than min_rows rows the test
  passes: a share of a handful of rows says nothing about concentration.
#}
{% test share_at_most(model, column_name, max_share, min_rows=0) %}
with counts as (
    select {{ column_name }} as value, count(*) as n
    from {{ model }}
    group by 1
),
total as (
    select sum(n) as n_total from counts
)
select counts.value, counts.n, total.n_total, counts.n / total.n_total as share
from counts cross join total
where total.n_total >= {{ min_rows }}
  and counts.n / total.n_total > {{ max_share }}
{% endtest %}
