{#
  no_fi_tags: fails on every row whose text still holds a template slot tag, opening or closing
  (<fi>, </fi>, any case, spaces inside the brackets allowed): a slot the instantiator left unfilled.
#}
{% test no_fi_tags(model, column_name) %}
select *
from {{ model }}
where regexp_matches({{ column_name }}, '</?\s*fi\s*>', 'i')
{% endtest %}
