{#
  value_in_range: fails on every row whose column lies outside [min_value, max_value] (bounds inclusive;
  leave one out for a one-sided range). Nulls are not counted here: pair it with not_null where they matter.
#}
{% test value_in_range(model, column_name, min_value=none, max_value=none) %}
select {{ column_name }} as out_of_range_value, *
from {{ model }}
where {{ column_name }} is not null
  and (
    false
    {% if min_value is not none %} or {{ column_name }} < {{ min_value }} {% endif %}
    {% if max_value is not none %} or {{ column_name }} > {{ max_value }} {% endif %}
  )
{% endtest %}
